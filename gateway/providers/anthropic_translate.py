"""OpenAI chat completions ↔ Anthropic Messages, both ways, streamed and not. Pure functions."""

from __future__ import annotations

import time
from typing import Any

import orjson

from core.errors import InvalidRequest
from core.sse import DONE, data_event
from core.types import MAX_TOKENS, Usage, excerpt, token_count

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
    "model_context_window_exceeded": "length",
}

_JSON_INSTRUCTION = "Respond with a single valid JSON object and nothing else: no prose, no code fences."


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _image_block(url: str) -> dict:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0] or "image/png"
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_blocks(content: Any, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image_block(part["image_url"]["url"]))
        else:
            raise InvalidRequest(
                f"Content part type '{kind}' is not supported by this model's provider.",
                param=f"{where}[{j}].type",
                code="unsupported_content",
            )
    return blocks


def _tool_use_blocks(calls: list[dict], where: str) -> list[dict]:
    blocks = []
    for j, call in enumerate(calls):
        fn = call["function"]
        try:
            args = orjson.loads(fn["arguments"]) if fn["arguments"].strip() else {}
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                "Tool call arguments must be a JSON object.",
                param=f"{where}[{j}].function.arguments",
                code="invalid_value",
            ) from None
        if not isinstance(args, dict):
            args = {"value": args}
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": args})
    return blocks


def _messages(messages: list[dict]) -> tuple[list[str], list[dict]]:
    system: list[str] = []
    out: list[dict] = []

    def push(role: str, blocks: list[dict]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for i, msg in enumerate(messages):
        role = msg["role"]
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            text = _text_of(msg.get("content"))
            if text:
                system.append(text)
        elif role == "user":
            push("user", _content_blocks(msg.get("content"), f"{where}.content"))
        elif role == "assistant":
            blocks = [b for b in _content_blocks(msg.get("content"), f"{where}.content") if b["type"] == "text"]
            blocks += _tool_use_blocks(msg.get("tool_calls") or [], f"{where}.tool_calls")
            push("assistant", blocks)
        elif role == "tool":
            content = msg.get("content")
            result: Any = content if isinstance(content, str) else _content_blocks(content, f"{where}.content")
            push("user", [{"type": "tool_result", "tool_use_id": msg["tool_call_id"], "content": result}])
        elif role == "function":
            push("user", [{"type": "text", "text": _text_of(msg.get("content")) or "(empty)"}])
    return system, out


def _tools(body: dict) -> tuple[list[dict] | None, dict | None]:
    tools = body.get("tools")
    converted = None
    if tools:
        converted = []
        for i, tool in enumerate(tools):
            if tool.get("type", "function") != "function":
                raise InvalidRequest(
                    f"Tool type '{excerpt(tool.get('type'))}' is not supported by this model's provider.",
                    param=f"tools[{i}].type",
                    code="unsupported_value",
                )
            fn = tool["function"]
            entry = {
                "name": fn["name"],
                "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
            }
            if fn.get("description"):
                entry["description"] = fn["description"]
            converted.append(entry)
    choice = body.get("tool_choice")
    tc: dict | None = None
    if choice == "auto":
        tc = {"type": "auto"}
    elif choice == "required":
        tc = {"type": "any"}
    elif choice == "none":
        tc = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        tc = {"type": "tool", "name": choice["function"]["name"]}
    if body.get("parallel_tool_calls") is False and converted:
        tc = {**(tc or {"type": "auto"}), "disable_parallel_tool_use": True}
    return converted, tc


def to_anthropic(body: dict, upstream_model: str, default_max_tokens: int) -> dict:
    """An Anthropic Messages request from a validated OpenAI chat request."""
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidRequest("n > 1 is not supported by this model's provider.", param="n", code="unsupported_value")
    system, messages = _messages(body["messages"])
    if not messages:
        raise InvalidRequest("At least one non-system message with content is required.", param="messages")
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        system.append(_JSON_INSTRUCTION)
    elif fmt.get("type") == "json_schema":
        try:
            schema = orjson.dumps(fmt["json_schema"].get("schema")).decode()
        except orjson.JSONEncodeError:
            raise InvalidRequest(
                "The JSON schema is nested too deeply (at most 250 levels).",
                param="response_format.json_schema.schema",
                code="invalid_value",
            ) from None
        system.append(f"{_JSON_INSTRUCTION} It must match this JSON schema: {schema}")
    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens,
    }
    if system:
        out["system"] = "\n\n".join(system)
    if body.get("temperature") is not None:
        out["temperature"] = min(float(body["temperature"]), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("user"):
        out["metadata"] = {"user_id": body["user"]}
    tools, tool_choice = _tools(body)
    if tools:
        out["tools"] = tools
    if tool_choice and (tools or tool_choice["type"] == "none"):
        out["tool_choice"] = tool_choice
    if body.get("stream"):
        out["stream"] = True
    return out


def usage_from_anthropic(usage: dict | None) -> Usage | None:
    """Anthropic's usage as OpenAI counts it (prompt tokens include cache reads and writes);
    None when a count it holds is no count (negative, text, a float that is NaN, a boolean): the
    gateway then estimates the usage. A count that is null or absent is 0 (cache fields are
    null when caching was not used); one beyond ``MAX_TOKENS`` is clamped."""
    usage = usage if isinstance(usage, dict) else {}
    counts = [
        token_count(usage.get(name) or 0)
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    ]
    if min(counts) < 0:
        return None
    inp, out, cached, created = counts
    return Usage(prompt_tokens=min(MAX_TOKENS, inp + cached + created), completion_tokens=out, cached_tokens=cached)


def from_anthropic(msg: dict) -> tuple[dict, Usage | None]:
    """An OpenAI ``chat.completion`` from an Anthropic message."""
    text: list[str] = []
    tool_calls = []
    for block in msg.get("content") or []:
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": orjson.dumps(block.get("input") or {}).decode()},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = usage_from_anthropic(msg.get("usage"))
    completion = {
        "id": msg.get("id", "msg"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(msg.get("stop_reason") or "end_turn", "stop"),
            }
        ],
        "usage": (usage or Usage()).to_openai(),  # (no counts: the gateway's estimate is billed)
    }
    return completion, usage


class StreamTranslator:
    """Anthropic stream events in, ``chat.completion.chunk`` SSE bytes out."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.id = "msg"
        self.model = ""
        self.created = int(time.time())
        self.usage = Usage()
        self.usage_valid = True  # False once the provider sent a count that is no count: estimate
        # The output count is known once ``message_delta`` gives it (``message_start`` says 1): a
        # stream that breaks, or whose client hangs up, before that is charged for what was sent.
        self.usage_final = False
        self.finish: str | None = None
        self.done = False
        self.started = False
        self._tool_index: dict[int, int] = {}

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return data_event(chunk)

    def _usage(self, usage: Usage | None) -> None:
        if usage is None:
            self.usage_valid = False
        else:
            self.usage = usage

    def feed(self, event: str | None, data: dict) -> bytes:
        kind = data.get("type", event)
        if kind == "message_start":
            msg = data.get("message") or {}
            self.id = msg.get("id", self.id)
            self.model = msg.get("model", self.model)
            self._usage(usage_from_anthropic(msg.get("usage")))
            self.started = True
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[data.get("index", 0)] = index
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                index = self._tool_index.get(data.get("index", 0), 0)
                return self._chunk(
                    {"tool_calls": [{"index": index, "function": {"arguments": delta.get("partial_json", "")}}]}
                )
            return b""
        if kind == "message_delta":
            stop = (data.get("delta") or {}).get("stop_reason")
            if stop:
                self.finish = FINISH_REASONS.get(stop, "stop")
            usage = data.get("usage")
            usage = usage if isinstance(usage, dict) else {}
            if usage.get("output_tokens") is not None:
                out = token_count(usage["output_tokens"])
                if out < 0:
                    self.usage_valid = False
                self.usage.completion_tokens = max(out, 0)
                self.usage_final = True
            if usage.get("input_tokens") is not None:  # newer API versions repeat it here
                got = usage_from_anthropic({**usage, "output_tokens": 0})
                if got is not None:
                    self.usage = Usage(got.prompt_tokens, self.usage.completion_tokens, got.cached_tokens)
                else:
                    self.usage_valid = False
            return b""
        if kind == "message_stop":
            self.done = True
            out = self._chunk({}, self.finish or "stop")
            # (without the output count, or with counts that are none, the gateway estimates the
            # usage and sends that chunk itself: one usage chunk, what was charged)
            if self.include_usage and self.usage_valid and self.usage_final:
                out += data_event(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": self.usage.to_openai(),
                    }
                )
            return out + DONE
        return b""  # ping, content_block_stop, unknown future events
