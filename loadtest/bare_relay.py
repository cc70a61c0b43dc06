"""The reference point for the gateway's throughput: the least a relay can do.

Starlette + one pooled aiohttp session, forwarding the body untouched to one upstream and the
answer back: no auth, no parsing, no metrics. ``make bench`` runs it beside the gateway so the
gateway's cost is read as a ratio against it, on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import contextlib

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await state["session"].close()

    async def relay(request: Request) -> Response:
        body = await request.body()
        async with state["session"].post(
            f"{upstream}/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer bench-key"},
        ) as resp:
            return Response(await resp.read(), status_code=resp.status, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", relay, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL ending in /v1")
    a = p.parse_args()
    uvicorn.run(
        build(a.upstream),
        host="127.0.0.1",
        port=a.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
