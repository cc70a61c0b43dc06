"""A gateway whose start-up fails after its services started (here: a VAPI account whose key is
not a key) stops them before it reports the failure. Left running, their tasks outlived the
failed start: the process then exits only once ``asyncio.run`` has cancelled each of them, and a
task that loses that one cancellation (Python 3.11's ``wait_for``, inside redis-py and our own
loops: ``core.background``) kept the process alive for good — ``gateway serve`` with a wrong key
hung now and then instead of exiting with the error."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from core.config import parse_config
from gateway import hitl_service
from gateway.app import GatewayApp
from gateway.services import Services, Settings


def _children() -> set[int]:
    """This process's child processes (the PII workers a start spawns)."""
    out: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        out |= {int(p) for p in (task / "children").read_text().split()}
    return out


def _settings(tmp_path: Path, services, **config) -> Settings:
    """A gateway's settings on the test's PostgreSQL and Valkey: one model group, and ``config``."""
    base = {
        "providers": [{"name": "pp", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_keys": ["k"]}],
        "models": [{"name": "m", "deployments": [{"provider": "pp", "model": "m"}]}],
    }
    config = parse_config({**base, **config})
    return Settings(config=config, database_url=services[0], redis_url=services[1], data_dir=tmp_path / "data")


def _start_up(settings: Settings) -> tuple[list[dict], list[str]]:
    """The app's lifespan start-up, in a loop of its own: what it sent, and the tasks it left running."""

    async def start() -> tuple[list[dict], list[str]]:
        app = GatewayApp(settings)
        sent: list[dict] = []
        messages = iter([{"type": "lifespan.startup"}])

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            sent.append(message)

        before = asyncio.all_tasks()
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
        for task in asyncio.all_tasks() - before:  # (without the fix: not to leak into other tests)
            task.cancel()
        await asyncio.gather(*(asyncio.all_tasks() - before), return_exceptions=True)
        return sent, left

    return asyncio.run(start())


def test_a_failed_start_stops_what_it_started(tmp_path, services):
    vapi = {
        "main": {
            "tenant": "startfail",
            "api_key": "sk-gw-not-a-key",
            "public_url": "https://gw.example.com",
            "auth": {"secret": "startfail-secret-0123456789"},
        }
    }
    sent, left = _start_up(_settings(tmp_path, services, channels={"vapi": vapi}))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "channels.vapi.main.api_key" in sent[0]["message"]
    assert left == []


def test_a_start_that_fails_part_way_stops_the_parts_it_had_started(tmp_path, services, monkeypatch):
    """``Services.start`` failing at its last part (here the human-in-the-loop service) stops the
    ledger, the writers, the registry, the PII workers, the pools… it had started, in reverse."""
    settings = _settings(tmp_path, services, pii={"policies": {"default": {"entities": {"email": "mask"}}}})

    async def refuses(*args, **kwargs):
        raise RuntimeError("the last part of the start failed")

    monkeypatch.setattr(hitl_service, "start", refuses)
    children = _children()

    async def start() -> list[str]:
        before = asyncio.all_tasks()
        try:
            await Services.start(settings)
        except RuntimeError as exc:
            assert "last part" in str(exc)
        else:
            raise AssertionError("the start did not fail")
        left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
        for task in asyncio.all_tasks() - before:  # (without the fix: not to leak into other tests)
            task.cancel()
        return left

    assert asyncio.run(start()) == []
    assert _children() - children == set()


def test_a_failed_start_up_stops_the_services_when_its_channel_fails_to_stop(tmp_path, services, monkeypatch):
    """The VAPI channel had started and the WhatsApp channel's start failed: the channel's stop
    failing too must not leave the services running (one ``try`` held both stops, and the
    channel's error skipped the services')."""
    from gateway import channels_whatsapp, vapi_channel

    settings = _settings(tmp_path, services)

    class Channel:  # a started channel whose stop fails
        async def stop(self) -> None:
            raise RuntimeError("the channel did not stop")

    async def channel(svc) -> Channel:
        return Channel()

    async def refuses(*args, **kwargs):
        raise RuntimeError("the WhatsApp channel did not start")

    monkeypatch.setattr(vapi_channel, "start", channel)
    monkeypatch.setattr(channels_whatsapp, "start", refuses)

    sent, left = _start_up(settings)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "WhatsApp channel did not start" in sent[0]["message"]
    assert left == []


def test_a_part_whose_stop_hangs_does_not_hide_the_failed_start(tmp_path, services, monkeypatch):
    """A part's stop that never returns is left after ``PART_STOP_S``: the start's own
    error is still raised (and so reported), the other parts still stopped."""
    from gateway import started
    from runtime.memory import Memory

    settings = _settings(tmp_path, services)

    async def refuses(*args, **kwargs):
        raise RuntimeError("the last part of the start failed")

    async def hangs(self) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(hitl_service, "start", refuses)
    monkeypatch.setattr(started, "PART_STOP_S", 0.5)
    monkeypatch.setattr(Memory, "stop", hangs)

    async def start() -> str:
        try:
            await asyncio.wait_for(Services.start(settings), 120)  # (without the bound: the test's own limit)
        except RuntimeError as exc:
            return str(exc)
        except TimeoutError:
            return "the failed start hung in a stop"
        return "the start did not fail"

    assert asyncio.run(start()) == "the last part of the start failed"


def _fails(settings: Settings, message: str) -> list[str]:
    """``Services.start`` raising ``message``: the tasks it left running (then cancelled, so that
    a failure here does not leak into other tests)."""

    async def start() -> list[str]:
        before = asyncio.all_tasks()
        try:
            await Services.start(settings)
        except RuntimeError as exc:
            assert message in str(exc)
        else:
            raise AssertionError("the start did not fail")
        left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
        for task in asyncio.all_tasks() - before:
            task.cancel()
        await asyncio.gather(*(asyncio.all_tasks() - before), return_exceptions=True)
        return left

    return asyncio.run(start())


def test_a_pii_worker_pool_whose_second_worker_fails_to_start_reaps_the_first(tmp_path, services, monkeypatch):
    """The pool's start spawned its first worker process, then the second's start failed: the
    first is stopped (its process reaped, its reader task ended) before the start raises; the
    part's own start failed, so no stop of the services' list covered it."""
    from policies.pii import workers

    settings = _settings(
        tmp_path, services, pii={"workers": 2, "policies": {"default": {"entities": {"email": "mask"}}}}
    )
    real_start = workers._Worker.start

    async def second_fails(self, warm):
        if self.index == 1:
            raise RuntimeError("the second PII worker did not start")
        await real_start(self, warm)

    monkeypatch.setattr(workers._Worker, "start", second_fails)
    children = _children()
    left = _fails(settings, "second PII worker")
    assert _children() - children == set()
    assert left == []


def test_a_hitl_start_whose_sweeper_fails_stops_its_feed(tmp_path, services, monkeypatch):
    """The escalation feed had started (its subscription task) and the SLA sweeper's start failed:
    the feed is stopped before the error goes up, not left listening."""
    from runtime.hitl import sla

    async def refuses(self) -> None:
        raise RuntimeError("the SLA sweeper did not start")

    monkeypatch.setattr(sla.Sweeper, "start", refuses)
    assert _fails(_settings(tmp_path, services), "SLA sweeper") == []


def test_a_failed_start_closes_the_embedding_thread_without_the_kb_worker(tmp_path, services, monkeypatch):
    """The knowledge bases' embedding thread is closed by a failed start even where this process
    runs no ingestion worker (its close came with the worker's stop, added only when it ran)."""
    from gateway import kb_worker

    closed: list[object] = []
    real_close = kb_worker.SerialEmbedder.close

    def close(self) -> None:
        closed.append(self)
        real_close(self)

    async def refuses(*args, **kwargs):
        raise RuntimeError("the last part of the start failed")

    monkeypatch.setenv("GATEWAY_KB_WORKER", "0")
    monkeypatch.setattr(kb_worker.SerialEmbedder, "close", close)
    monkeypatch.setattr(hitl_service, "start", refuses)
    assert _fails(_settings(tmp_path, services), "last part") == []
    assert len(closed) == 1


def test_a_part_whose_stop_raises_does_not_keep_the_others_running(tmp_path, services, monkeypatch):
    """``Services.stop`` runs the list its start made (the one a failed start runs): each part
    stopped whatever an earlier one's stop raised. Its own list of parts stopped at the first
    error: the ledger's here left the readers, the PII workers and the pools running."""
    from policies.ledger import LedgerWriter

    settings = _settings(tmp_path, services, pii={"policies": {"default": {"entities": {"email": "mask"}}}})
    real_stop = LedgerWriter.stop

    async def fails(self, grace: float = 30.0) -> None:
        await real_stop(self, grace)
        raise RuntimeError("the ledger's stop failed")

    monkeypatch.setattr(LedgerWriter, "stop", fails)
    children = _children()

    async def start_and_stop() -> list[str]:
        before = asyncio.all_tasks()
        svc = await Services.start(settings)
        with contextlib.suppress(RuntimeError):  # (without the fix: raised, the rest not stopped)
            await svc.stop()
        left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
        for task in asyncio.all_tasks() - before:
            task.cancel()
        await asyncio.gather(*(asyncio.all_tasks() - before), return_exceptions=True)
        if svc.pii is not None:
            await svc.pii.close()
        return left

    assert asyncio.run(start_and_stop()) == []
    assert _children() - children == set()


def test_a_policy_engine_whose_second_script_fails_to_load_closes_its_connection(tmp_path, services, monkeypatch):
    """The engine's first script load opened its pipelined connection, the second failed: the
    connection is closed before the start raises (its stop was never added: its start failed)."""
    from core.fastredis import PipelinedRedis

    real_load = PipelinedRedis.script_load
    loads: list[PipelinedRedis] = []

    async def second_fails(self, script: str) -> str:
        loads.append(self)
        if len(loads) == 2:
            raise RuntimeError("the second script did not load")
        return await real_load(self, script)

    monkeypatch.setattr(PipelinedRedis, "script_load", second_fails)
    assert _fails(_settings(tmp_path, services), "second script") == []
    engines = loads[1]
    assert engines is loads[0]  # (both loads were the engine's, on one connection)
    assert engines._proto is None or engines._proto.transport.is_closing()


def test_alerts_whose_second_webhook_sender_fails_to_start_close_the_first(tmp_path, services, monkeypatch):
    """The alert sender's first webhook sender opened its HTTP session, the second's start failed:
    the session is closed before the start raises."""
    from policies.webhooks import WebhookSender

    real_start = WebhookSender.start
    senders: list[WebhookSender] = []

    async def second_fails(self) -> None:
        senders.append(self)
        if len(senders) == 2:
            raise RuntimeError("the second webhook sender did not start")
        await real_start(self)

    monkeypatch.setattr(WebhookSender, "start", second_fails)
    assert _fails(_settings(tmp_path, services), "second webhook sender") == []
    assert senders[0]._session is None


def test_a_whatsapp_channel_whose_worker_fails_to_start_is_stopped(tmp_path, services, monkeypatch):
    """The WhatsApp channel had opened its database pool and clients, then its worker's start
    failed: the channel is stopped (its pool closed) before the start-up reports the failure;
    the app's list had no stop of it yet."""
    from channels.whatsapp.channel import WhatsApp

    made: list[WhatsApp] = []
    real_from_config = WhatsApp.from_config.__func__

    async def from_config(cls, *args, **kwargs):
        channel = await real_from_config(cls, *args, **kwargs)
        made.append(channel)
        return channel

    async def refuses(self) -> None:
        raise RuntimeError("the WhatsApp worker did not start")

    monkeypatch.setattr(WhatsApp, "from_config", classmethod(from_config))
    monkeypatch.setattr(WhatsApp, "start_worker", refuses)
    monkeypatch.setenv("GATEWAY_CHANNEL_WORKER", "1")
    account = {
        "tenant": "startfail",
        "phone_numbers": {"1000001": "wabot"},
        "app_secret": "startfail-app-secret-0123456789",
        "verify_token": "startfail-verify",
        "access_token": "startfail-token",
        "api_key": "sk-gw-not-a-key",
    }
    sent, left = _start_up(_settings(tmp_path, services, channels={"whatsapp": {"main": account}}))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "WhatsApp worker did not start" in sent[0]["message"]
    assert left == []
    assert len(made) == 1 and made[0].pool._closed


def test_a_failed_start_up_stops_every_part_of_the_services_past_one_whose_stop_hangs(tmp_path, services, monkeypatch):
    """The start-up failed after the services had started (a VAPI account whose key is not a key)
    and one of their parts' stop hangs: that part is left after ``PART_STOP_S``, every part after
    it (the PII workers, the pools, the key and budget listeners) still stopped. The app's list
    bounded the services' whole stop by ``PART_STOP_S`` too, the same bound as each of its parts:
    it ran out first, in the hung part, and cut the stop of all the rest short."""
    from gateway import started
    from runtime.tools import ToolRunner

    vapi = {
        "main": {
            "tenant": "startfail",
            "api_key": "sk-gw-not-a-key",
            "public_url": "https://gw.example.com",
            "auth": {"secret": "startfail-secret-0123456789"},
        }
    }
    settings = _settings(
        tmp_path, services, channels={"vapi": vapi}, pii={"policies": {"default": {"entities": {"email": "mask"}}}}
    )

    real_stop = ToolRunner.stop

    async def hangs(self) -> None:
        await real_stop(self)  # (its HTTP sessions closed, not left to the collector's warning)
        await asyncio.Event().wait()

    monkeypatch.setattr(started, "PART_STOP_S", 0.5)
    monkeypatch.setattr(ToolRunner, "stop", hangs)  # (a part with no task of its own)
    children = _children()
    sent, left = _start_up(settings)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "channels.vapi.main.api_key" in sent[0]["message"]
    assert left == []
    assert _children() - children == set()


def test_a_part_whose_stop_raises_cancelled_error_does_not_keep_the_others_running(tmp_path, services, monkeypatch):
    """A part's stop raising ``CancelledError`` of its own (an awaited task some other code had
    cancelled), while the stop itself is not cancelled: the part's failure, logged like any other,
    and every other part still stopped. It went up through the group's ``gather`` and the list's
    loop: the rest of the readers' group was left mid-stop, and the PII workers, the listeners
    and the pools not stopped at all."""
    from runtime.tools import ToolRunner

    settings = _settings(tmp_path, services, pii={"policies": {"default": {"entities": {"email": "mask"}}}})

    real_stop = ToolRunner.stop

    async def raises(self) -> None:
        await real_stop(self)
        raise asyncio.CancelledError()

    monkeypatch.setattr(ToolRunner, "stop", raises)
    children = _children()

    async def start_and_stop() -> tuple[str, list[str]]:
        before = asyncio.all_tasks()
        svc = await Services.start(settings)
        try:
            await svc.stop()
            outcome = "stopped"
        except asyncio.CancelledError:
            outcome = "CancelledError raised"
        left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
        for task in asyncio.all_tasks() - before:  # (without the fix: not to leak into other tests)
            task.cancel()
        await asyncio.gather(*(asyncio.all_tasks() - before), return_exceptions=True)
        if svc.pii is not None:
            await svc.pii.close()
        return outcome, left

    assert asyncio.run(start_and_stop()) == ("stopped", [])
    assert _children() - children == set()
