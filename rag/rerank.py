"""Re-ranking: one interface, and a client for the Cohere-compatible ``/v1/rerank`` wire format
(Cohere, Jina, Voyage, TEI, Infinity, LocalAI and the gateway's own endpoint speak it).

Request ``{"model", "query", "documents": [str], "top_n"}``; response
``{"results": [{"index", "relevance_score"}, ...]}``. Any failure (timeout, connection, non-2xx,
a malformed answer) raises ``RerankError``; ``rag.retrieve`` then keeps the fused order and
says so in its explanation.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

MAX_DOCUMENTS = 1000


class RerankError(Exception):
    """The re-ranker did not answer usably; the message is safe to show (no secrets)."""


class Reranker(Protocol):
    name: str

    async def rerank(self, query: str, documents: list[str], top_n: int) -> list[tuple[int, float]]:
        """(index into ``documents``, relevance score), best first, at most ``top_n``."""
        ...


class HttpReranker:
    """A provider rerank API over aiohttp. ``url`` is the endpoint (``.../v1/rerank``)."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        model: str,
        *,
        timeout: float = 5.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url
        self.model = model
        self.name = f"http:{model}"
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def rerank(self, query: str, documents: list[str], top_n: int) -> list[tuple[int, float]]:
        if not documents:
            return []
        if len(documents) > MAX_DOCUMENTS:
            raise RerankError(f"at most {MAX_DOCUMENTS} documents per re-rank")
        top_n = max(1, min(top_n, len(documents)))
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        body = {"model": self.model, "query": query, "documents": documents, "top_n": top_n}
        session = await self._client()
        try:
            async with session.post(self.url, json=body, headers=headers, timeout=self._timeout) as resp:
                if resp.status >= 400:
                    raise RerankError(f"re-ranker answered HTTP {resp.status}")
                data = await resp.json(content_type=None)
        except TimeoutError:
            raise RerankError(f"re-ranker timed out after {self._timeout.total:g} s") from None
        except aiohttp.ClientError as exc:
            raise RerankError(f"re-ranker unreachable ({type(exc).__name__})") from None
        except ValueError:
            raise RerankError("re-ranker answered with invalid JSON") from None
        return parse_results(data, len(documents), top_n)


def parse_results(data: object, count: int, top_n: int) -> list[tuple[int, float]]:
    """Validate a ``{"results": [{"index", "relevance_score"}]}`` answer; best first."""
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise RerankError("re-ranker answer has no results list")
    out: list[tuple[int, float]] = []
    seen: set[int] = set()
    for item in results:
        if not isinstance(item, dict):
            raise RerankError("re-ranker result is not an object")
        index, score = item.get("index"), item.get("relevance_score")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count or index in seen:
            raise RerankError("re-ranker result has an invalid index")
        if not isinstance(score, int | float) or isinstance(score, bool):
            raise RerankError("re-ranker result has an invalid relevance_score")
        seen.add(index)
        out.append((index, float(score)))
    out.sort(key=lambda p: -p[1])
    return out[:top_n]
