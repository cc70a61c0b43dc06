"""The worker's garbage-collector settings, applied once start-up is done.

CPython's cyclic collector scans every tracked object of a generation when it runs. After
start-up a worker holds ~100,000 long-lived objects (configuration, the Jinja2 and tiktoken
state, routing tables, prometheus metrics); with the default thresholds (700, 10, 10) an agent
turn allocates enough to trigger a young collection on almost every request and a full one —
45 ms of scanning those long-lived objects, a pause for every request in flight — every ~2,000
requests. Measured (loadtest: gateway CPU per request, 2,000 requests per kind): the collector
took ~40 µs per request on average.

``settle()`` moves what start-up built into the permanent generation (``gc.freeze()``: never
scanned again; reference counting still frees it) and raises the young generation's threshold,
so a collection runs every few thousand allocations over objects that are actually young.
Cycles are still collected; only less often. ``GATEWAY_GC_GEN0`` sets the young threshold
(default 7000); ``0`` leaves the interpreter's defaults alone.
"""

from __future__ import annotations

import gc
import os

DEFAULT_GEN0 = 7000


def settle() -> None:
    try:
        gen0 = int(os.environ.get("GATEWAY_GC_GEN0", DEFAULT_GEN0))
    except ValueError:
        gen0 = DEFAULT_GEN0
    if gen0 <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0, 20, 20)
