"""How every mock server of the load tests runs: uvicorn on uvloop + httptools, quiet, a deep
backlog for wrk's connection bursts, and a short graceful shutdown."""

from __future__ import annotations


def run(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
