"""What-if stubs for ``loadtest/bench_agent_ceiling.py`` (never product code): loaded by every
Python process whose ``PYTHONPATH`` holds this directory; does nothing unless
``GW_BENCH_STUB`` names parts of an agent turn to replace with nothing, comma-separated:

- ``memory``: ``Memory.load`` answers an empty window without Redis, ``Memory.append`` stores
  nothing, and the memory writer (Redis stream → PostgreSQL) is not started;
- ``history``: with ``memory``, the load answers a fixed window of 40 messages (20 turns, the
  bench's full window) without Redis: what carrying the history costs, apart from memory;
- ``memory-writer``: memory as shipped, but its writer (Redis stream → PostgreSQL) not started:
  the stream keeps the turns (what the request path costs, apart from the background copy);
- ``runs``: no run record (``RunRecorder.record``) and no confidence score (``after_answer``).

A renamed function fails the gateway's start (AttributeError), never a silent no-op.
"""

import os

_STUBS = {s for s in os.environ.get("GW_BENCH_STUB", "").split(",") if s}

if _STUBS:
    import runtime.memory as _memory

    if "memory" in _STUBS:
        _REPLY = "Hello! This is a mock reply from the provider."
        _MESSAGES = [
            {"role": "user", "content": "Say hello to the benchmark, politely."} if i % 2 == 0 else
            {"role": "assistant", "content": _REPLY}
            for i in range(40)
        ]  # fmt: skip
        _TOKENS = [_memory.message_tokens(m) for m in _MESSAGES]

        async def _load(self, tenant, agent, conversation_id, **kwargs):
            out = _memory.Window()
            out.tokens = []
            if "history" in _STUBS:
                out.extend(dict(m) for m in _MESSAGES)
                out.tokens = list(_TOKENS)
            out.seq = 0
            return out

        async def _append(self, *args, **kwargs):
            return None

        async def _start(self):
            return None

        async def _stop(self):
            return None

        for _name, _fn in (("load", _load), ("append", _append), ("start", _start), ("stop", _stop)):
            getattr(_memory.Memory, _name)  # renamed: fail here
            setattr(_memory.Memory, _name, _fn)

    if "memory-writer" in _STUBS:

        async def _start_without_writer(self):
            if self._fast is not None:
                self._append_sha = await self._fast.script_load(_memory._APPEND)
                self._load_sha = await self._fast.script_load(_memory._LOAD)

        async def _stop_without_writer(self):
            if self._fast is not None:
                await self._fast.close()

        _memory.Memory.start = _start_without_writer
        _memory.Memory.stop = _stop_without_writer

    if "runs" in _STUBS:
        import gateway.hitl_stage as _hitl
        import runtime.runs as _runs

        async def _after_answer(svc, ctx, raw, message):
            return raw, message

        _runs.RunRecorder.record  # noqa: B018 (renamed: fail here)
        _runs.RunRecorder.record = lambda self, run: None
        _hitl.after_answer  # noqa: B018
        _hitl.after_answer = _after_answer
