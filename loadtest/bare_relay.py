"""The reference point for the gateway's throughput: the least a relay can do.

Starlette + one pooled HTTP client session, forwarding the body untouched to one upstream and
the answer back: no auth, no parsing, no metrics. A request whose body asks for a stream
(``"stream": true``, found by a byte search, not parsed) is relayed as a stream: every chunk
the upstream sends is passed on as it comes (the bare streaming relay). ``make bench`` runs it
beside the gateway so the gateway's cost is read as a ratio against it, on the same machine in
the same run.

``--client`` picks the upstream HTTP client (aiohttp, the gateway's; httpx; httpcore), for the
client evaluation in loadtest/results/eval-server-client.md.
"""

from __future__ import annotations

import argparse
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-key"}


def _wants_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


def build(upstream: str, client: str = "aiohttp") -> Starlette:
    state: dict = {}
    url = f"{upstream}/chat/completions"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if client == "aiohttp":
            import aiohttp

            state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            yield
            await state["session"].close()
        elif client == "httpx":
            import httpx

            state["session"] = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256)
            )
            yield
            await state["session"].aclose()
        else:
            import httpcore

            state["session"] = httpcore.AsyncConnectionPool(max_connections=1024, max_keepalive_connections=256)
            yield
            await state["session"].aclose()

    async def relay_aiohttp(request: Request) -> Response:
        body = await request.body()
        session = state["session"]
        if _wants_stream(body):
            resp = await session.post(url, data=body, headers=HEADERS)

            async def chunks():
                try:
                    async for data in resp.content.iter_any():
                        yield data
                finally:
                    resp.release()

            return StreamingResponse(chunks(), status_code=resp.status, media_type="text/event-stream")
        async with session.post(url, data=body, headers=HEADERS) as resp:
            return Response(await resp.read(), status_code=resp.status, media_type="application/json")

    async def relay_httpx(request: Request) -> Response:
        body = await request.body()
        session = state["session"]
        if _wants_stream(body):
            resp = await session.send(session.build_request("POST", url, content=body, headers=HEADERS), stream=True)

            async def chunks():
                try:
                    async for data in resp.aiter_raw():
                        yield data
                finally:
                    await resp.aclose()

            return StreamingResponse(chunks(), status_code=resp.status_code, media_type="text/event-stream")
        resp = await session.post(url, content=body, headers=HEADERS)
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    async def relay_httpcore(request: Request) -> Response:
        body = await request.body()
        pool = state["session"]
        headers = list(HEADERS.items())
        if _wants_stream(body):
            cm = pool.stream("POST", url, headers=headers, content=body)
            resp = await cm.__aenter__()

            async def chunks():
                try:
                    async for data in resp.aiter_stream():
                        yield data
                finally:
                    await cm.__aexit__(None, None, None)

            return StreamingResponse(chunks(), status_code=resp.status, media_type="text/event-stream")
        resp = await pool.request("POST", url, headers=headers, content=body)
        return Response(resp.content, status_code=resp.status, media_type="application/json")

    relay = {"aiohttp": relay_aiohttp, "httpx": relay_httpx, "httpcore": relay_httpcore}[client]
    return Starlette(routes=[Route("/v1/chat/completions", relay, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL ending in /v1")
    p.add_argument("--client", choices=("aiohttp", "httpx", "httpcore"), default="aiohttp")
    a = p.parse_args()
    uvicorn.run(
        build(a.upstream, a.client),
        host="127.0.0.1",
        port=a.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
