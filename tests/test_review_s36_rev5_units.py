"""A client's hang-up against a non-streamed answer, without HTTP: the interleaving is set up with
events (the disconnect delivered while the gateway counts an answer that has come), never a wait
of some length. The provider's call and the count are stand-ins; ``pipeline.call`` is the real one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from core.http import ClientGone
from core.types import RequestContext, Usage
from gateway import pipeline


def test_attack_hangup_while_an_answer_is_counted_leaves_it_charged(monkeypatch):
    """The answer came whole (the provider made it, and bills it); the client hangs up while the
    gateway counts its tokens (a provider without usage: a large answer is counted in a worker
    thread, for up to seconds). The hang-up cancelled the count and the request was charged its
    prompt alone."""

    async def run() -> RequestContext:
        loop = asyncio.get_running_loop()
        left = asyncio.Event()
        noticed = loop.create_future()

        async def receive() -> dict:
            try:
                await left.wait()
            finally:  # runs once the watcher has acted on the disconnect, or no longer watches
                loop.call_soon(noticed.set_result, None)
            return {"type": "http.disconnect"}

        async def upstream(router, ctx, group, attempt, hold=False) -> bytes:
            ctx.route = SimpleNamespace(provider="pp", deployment="d")
            await asyncio.sleep(0)  # (the provider's answer comes in a later turn of the loop: the watcher watches)
            return b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "long answer"}}]}'

        async def estimate(ctx, raw: bytes) -> Usage:
            if not raw:  # (the prompt of a request that got no answer)
                return Usage(prompt_tokens=5)
            left.set()  # the client hangs up while the answer is counted
            await noticed
            return Usage(prompt_tokens=5, completion_tokens=50)

        monkeypatch.setattr(pipeline, "HANGUP_WATCH_AFTER_S", 0)  # (watching from the start: a slow provider's case)
        monkeypatch.setattr(pipeline, "run_attempts", upstream)
        monkeypatch.setattr(pipeline, "_estimate", estimate)
        svc = SimpleNamespace(config=SimpleNamespace(policies=SimpleNamespace(enabled=False)), router=None, adapters={})
        ctx = RequestContext(request_id="r", endpoint="chat", body={}, started=0.0)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        with _maybe_gone():
            await pipeline.call(svc, ctx, None, {"headers": []}, send, receive)
        assert asyncio.current_task().cancelling() == 0  # no cancel left behind for the settlement
        return ctx

    ctx = asyncio.run(run())
    assert ctx.usage is not None and ctx.usage.completion_tokens == 50, ctx.usage


class _maybe_gone:
    """The answer may still be sent to the client gone, or the request end as ``ClientGone``:
    either way it is charged what the provider made."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is ClientGone
