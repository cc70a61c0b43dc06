"""The learning loop: what people answered becomes the agent's learned examples.

A resolution with a corrected answer (or the AI's draft, approved as it was) adds a *pending*
example (question → answer) to the agent. An admin reviews it (``approve`` / ``reject``); an
approved example is indexed in the agent's "learned answers" knowledge base, so the next
similar question retrieves the person's answer as grounding. Indexing is the composition's
(the knowledge-base pipeline lives in ``rag``, which the runtime does not import): it passes an
``Indexer``. Approved examples export as OpenAI fine-tuning JSONL (``{"messages": [...]}`` a line).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Protocol

import orjson

from core.errors import InvalidRequest, NotFound

MAX_QUESTION = 8000
MAX_ANSWER = 16000
STATUSES = ("pending", "approved", "rejected")


class Indexer(Protocol):
    async def index(self, conn, agent, example: dict) -> tuple[str, str]:
        """Index the example for ``agent``; returns (knowledge base id, document id)."""

    async def unindex(self, conn, tenant: str, kb_id: str, document_id: str) -> None: ...


def new_id() -> str:
    return "lex_" + secrets.token_hex(8)


def _out(row) -> dict | None:
    if row is None:
        return None
    d = dict(row)
    d["object"] = "learned_example"
    return d


async def add(
    conn, *, tenant: str, agent_id: str, escalation_id: str | None, question: str, answer: str, created_by: str
) -> dict | None:
    """A pending example; None when there is nothing to learn (no question or no answer)."""
    question, answer = (question or "").strip(), (answer or "").strip()
    if not question or not answer:
        return None
    row = await conn.fetchrow(
        """INSERT INTO learned_examples (id, tenant, agent_id, escalation_id, question, answer, created_by)
           VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
        new_id(),
        tenant,
        agent_id,
        escalation_id,
        question[:MAX_QUESTION],
        answer[:MAX_ANSWER],
        created_by,
    )
    return _out(row)


async def list_for(conn, tenant: str, agent_id: str, status: str | None = None, limit: int = 100) -> list[dict]:
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"'status' must be one of {', '.join(STATUSES)}.", param="status", code="invalid_value")
    rows = await conn.fetch(
        """SELECT * FROM learned_examples WHERE tenant = $1 AND agent_id = $2 AND ($3::text IS NULL OR status = $3)
           ORDER BY created_at DESC LIMIT $4""",
        tenant,
        agent_id,
        status,
        max(1, min(limit, 1000)),
    )
    return [_out(r) for r in rows]


async def get(conn, tenant: str, agent_id: str, example_id: str) -> dict:
    row = await conn.fetchrow(
        "SELECT * FROM learned_examples WHERE id = $1 AND tenant = $2 AND agent_id = $3 FOR UPDATE",
        example_id,
        tenant,
        agent_id,
    )
    if row is None:
        raise NotFound(f"No learned example {example_id[:64]!r} for this agent.", param="id")
    return _out(row)


async def approve(conn, agent, example_id: str, reviewer: str, indexer: Indexer) -> dict:
    """Approved and indexed in one transaction (the caller's): an index that fails approves nothing."""
    example = await get(conn, agent.tenant, agent.id, example_id)
    if example["status"] == "approved":
        return example
    kb_id, document_id = await indexer.index(conn, agent, example)
    row = await conn.fetchrow(
        """UPDATE learned_examples SET status = 'approved', kb_id = $2, document_id = $3, reviewed_by = $4,
                  reviewed_at = now()
           WHERE id = $1 RETURNING *""",
        example_id,
        kb_id,
        document_id,
        reviewer,
    )
    return _out(row)


async def reject(conn, agent, example_id: str, reviewer: str, indexer: Indexer) -> dict:
    """Rejected; an example approved before is taken out of the knowledge base."""
    example = await get(conn, agent.tenant, agent.id, example_id)
    if example["status"] == "approved" and example["document_id"]:
        await indexer.unindex(conn, agent.tenant, example["kb_id"], example["document_id"])
    row = await conn.fetchrow(
        """UPDATE learned_examples SET status = 'rejected', kb_id = NULL, document_id = NULL, reviewed_by = $2,
                  reviewed_at = now()
           WHERE id = $1 RETURNING *""",
        example_id,
        reviewer,
    )
    return _out(row)


def training_line(example: dict, system: str | None = None) -> bytes:
    """One line of an OpenAI fine-tuning file: the question and the person's answer."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": example["question"]}, {"role": "assistant", "content": example["answer"]}]
    return orjson.dumps({"messages": messages}) + b"\n"


TRAINING_PAGE = 100


async def training_data(transaction, tenant: str, agent_id: str, system: str | None = None) -> AsyncIterator[bytes]:
    """The approved examples as JSONL, by id (read in pages: no size limit in memory).
    ``transaction()`` opens a transaction giving a connection; each page is read in one of its
    own, closed before the page's lines are yielded — the client reading them at its own pace
    (or not at all) never holds a pooled connection."""
    last = ""
    while True:
        async with transaction() as conn:
            rows = await conn.fetch(
                """SELECT id, question, answer FROM learned_examples
                   WHERE tenant = $1 AND agent_id = $2 AND status = 'approved' AND id > $3
                   ORDER BY id LIMIT $4""",
                tenant,
                agent_id,
                last,
                TRAINING_PAGE,
            )
        if not rows:
            return
        for r in rows:
            yield training_line(dict(r), system)
        last = rows[-1]["id"]
