"""A process's tool-call slots shared by tenants (runtime/tool_slots.py): two tenants with slow
tools held all of them before (each tenant's cap was half), and every other tenant's calls waited
out their deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from runtime.tool_slots import ToolSlots
from runtime.tools import ToolRunner
from tests.test_tools import LOOPBACK, agent_with, call, http_tool, tools_server  # noqa: F401 (fixture)


def test_two_tenants_with_slow_tools_leave_a_slot_for_a_third(tools_server):  # noqa: F811
    slow = http_tool("slow", f"{tools_server.url}/slow?delay_ms=8000", timeout_s=30)
    fast = http_tool("w", f"{tools_server.url}/weather?city=x")

    def of(tenant: str, spec: dict):
        return dataclasses.replace(agent_with(spec), tenant=tenant)

    def slow_calls_arrived() -> int:
        return sum(1 for r in tools_server.requests() if r["raw_path"].startswith("/slow"))

    async def go():
        runner = ToolRunner(guard=LOOPBACK, max_concurrency=4)
        await runner.start()
        busy = []
        try:
            tools_server.clear()
            for tenant in ("t1", "t2"):
                calls = [call("slow", {}, f"{tenant}-{i}") for i in range(4)]
                turn = runner.run(of(tenant, slow), calls, deadline=time.monotonic() + 25, context={"tenant": tenant})
                busy.append(asyncio.create_task(turn))
            for _ in range(400):  # both tenants' slow calls hold their slots (at the tool server)
                if await asyncio.to_thread(slow_calls_arrived) >= 3:
                    break
                await asyncio.sleep(0.05)
            # before: t1 2 + t2 2 of 4 slots, for 8 s: the third tenant's call timed out
            return await runner.run(
                of("t3", fast), [call("w", {}, "c")], deadline=time.monotonic() + 4, context={"tenant": "t3"}
            )
        finally:
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            await runner.stop()

    (third,) = asyncio.run(go())
    assert third.status == "ok", third.content


def test_a_tenants_cap_leaves_room_for_one_tenant_more():
    async def go() -> list[int]:
        slots = ToolSlots(16)
        held = []
        for tenant in ("a", "b", "c"):
            n = 0
            while slots.cap(tenant) > slots.held(tenant) and slots._free > 0:  # what it may take now
                await slots._acquire(tenant)
                n += 1
            held.append(n)
        return held

    # alone: half; with one other holding: a third; with two: a quarter (what is left of it)
    assert asyncio.run(go()) == [8, 5, 3]


def test_freed_slots_go_to_the_waiting_tenants_in_turn_and_a_cancelled_wait_leaks_none():
    async def go():
        slots = ToolSlots(2)
        order: list[str] = []
        await slots._acquire("x")  # x: its cap (1 of 2); y: the other
        await slots._acquire("y")

        async def wants(tenant: str, tag: str) -> None:
            async with slots.slot(tenant):
                order.append(tag)
                await asyncio.sleep(0)

        waiters = [asyncio.create_task(wants("x", f"x{i}")) for i in range(3)]
        waiters.append(asyncio.create_task(wants("z", "z0")))
        waiters.append(asyncio.create_task(wants("y", "y0")))
        cancelled = asyncio.create_task(wants("z", "never"))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        slots._release("x")
        slots._release("y")
        await asyncio.gather(*waiters)
        return order, slots._free, dict(slots._held), dict(slots._waiting)

    order, free, held, waiting = asyncio.run(go())
    # x's first call was granted first (its turn came first), then z and y before x's next ones
    assert order[0] == "x0" and order.index("z0") < order.index("x1") and order.index("y0") < order.index("x2")
    assert "never" not in order
    assert (free, held, waiting) == (2, {}, {})


def test_a_release_that_raises_a_waiting_tenants_cap_by_more_than_one_grants_each_slot_it_may_take():
    # b's last release lifts a's cap from 2 (of 8, b holding) to 4: both of a's waiting calls may
    # run now; one pass granted each tenant a single call, and the other waited, with 6 slots free,
    # until one of a's running calls ended (a slow tool: its deadline first)
    async def go():
        slots = ToolSlots(8)
        for tenant in ("a", "a", "b", "b"):
            await slots._acquire(tenant)
        assert slots.cap("a") == slots.held("a") == 2
        waiters = [asyncio.create_task(slots._acquire("a")) for _ in range(2)]
        await asyncio.sleep(0)
        slots._release("b")
        slots._release("b")
        for _ in range(10):
            await asyncio.sleep(0)
        granted = sum(w.done() for w in waiters)
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        return granted

    assert asyncio.run(go()) == 2
