"""What the agent runtime's parts share: agents, prompt versions, tools, turns.

The parts — the registry (agents.py, prompts.py), memory (memory.py), tools (tools.py) and run
records (runs.py) — each own one concern; the gateway's pipeline composes them. Everything here
is plain data: no I/O, nothing imported from outside ``core``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AGENT_PREFIX = "agent:"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A server-side tool an agent declares. ``kind``: ``http`` | ``mcp`` | ``builtin``.

    ``parameters`` is the JSON schema of its arguments (what the model sees, and what a call's
    arguments are validated against). ``config`` is kind-specific: for ``http`` the method, URL
    template, headers (``${ENV}`` secrets resolved at load, never shown), timeout, retries and
    allowed hosts; for ``mcp`` the server URL and the tool's name there; for ``builtin`` nothing.
    """

    name: str
    description: str
    parameters: dict
    kind: str
    config: dict = field(default_factory=dict)

    def openai(self) -> dict:
        """The tool as an OpenAI ``tools[]`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True, slots=True)
class MemorySettings:
    window_turns: int = 20  # most recent turns (a user message and what answered it) sent back
    window_tokens: int = 4000  # and at most this many tokens of them
    ttl_s: int = 7 * 86400  # the recent window in Redis expires after this much silence
    # a conversation silent this many days is deleted (gateway/conversation_retention.py); 0: kept
    # for good. The window in Redis is then kept no longer than that either.
    retention_days: int = 0

    def __post_init__(self) -> None:
        if self.retention_days > 0 and self.ttl_s > self.retention_days * 86400:
            object.__setattr__(self, "ttl_s", self.retention_days * 86400)


@dataclass(frozen=True, slots=True)
class PromptVersion:
    """One immutable save of an agent's prompt: a Jinja2 template (rendered sandboxed, strict
    undefined) and the variables it takes: {name: {"type", "required", "default", "description"}}."""

    version: int
    template: str
    variables: dict = field(default_factory=dict)
    note: str | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    tenant: str
    name: str
    model: str  # the model group its turns are served from
    description: str = ""
    defaults: dict = field(default_factory=dict)  # variable values used when a request gives none
    max_steps: int = 5  # model calls per turn, the tools loop included
    fallback_message: str | None = None  # answered when every deployment fails
    tools: tuple[ToolSpec, ...] = ()
    builtins: tuple[str, ...] = ()  # knowledge_search, escalate_to_human, end_conversation
    memory: MemorySettings = MemorySettings()
    knowledge_bases: tuple[str, ...] = ()
    # label -> {version: weight}; "latest" is maintained by the registry
    labels: dict[str, dict[int, int]] = field(default_factory=dict)
    versions: dict[int, PromptVersion] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # anything else, as stored


@dataclass(frozen=True, slots=True)
class Selection:
    """Which prompt a turn runs: the version, and how it was chosen."""

    version: PromptVersion
    label: str | None  # the label asked for or defaulted to ("production", else "latest"); None when pinned
    variant: str | None  # the A/B arm ("7" of {"7": 50, "8": 50}) when the label has several, else None


@dataclass(frozen=True, slots=True)
class ToolResult:
    tool_call_id: str
    name: str
    content: str  # what goes back to the model as the tool message
    status: str  # "ok" | "error" | "invalid" (arguments failed the schema) | "timeout"
    duration_ms: float = 0.0
    arguments: Any = None
    escalate: bool = False  # escalate_to_human was called
    end: bool = False  # end_conversation was called


@dataclass(slots=True)
class Turn:
    """The agent part of one request (``RequestContext.agent``)."""

    agent: Agent
    selection: Selection
    conversation_id: str | None  # the caller's id (metadata.conversation_id / x-gateway-conversation)
    variables: dict
    new_messages: list[dict]  # what the client sent this turn (stored in memory after the answer)
    history: list = field(default_factory=list)  # what memory gave (runtime.memory.Window): the next append's base
    memory_error: str | None = None  # memory was unavailable: the turn answered without it
    steps: list[dict] = field(default_factory=list)  # one entry per model call and per tool call
    degraded: bool = False  # answered with the fallback message
    client_tools: frozenset = frozenset()  # names of tools the client passed (its own to run)
    citations: list = field(default_factory=list)  # knowledge-base sources given to the model
    hold: str | None = None  # the escalation holding the conversation (a person answers, not the model)
    escalation_id: str | None = None  # the escalation this turn opened or joined
    confidence: Any = None  # runtime.hitl.confidence.Confidence of the answer
    # (the conversation's erasure mark key, the turn's proven queue time in µs): a channel's turn
    # queued before its conversation's erasure reads and stores nothing (runtime.memory ``erased``)
    erased_mark: tuple[str, int] | None = None

    @property
    def memory_loaded(self) -> int:
        """Messages prepended from memory."""
        return len(self.history)
