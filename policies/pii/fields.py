"""Every text of a request body that leaves the gateway, and how to put a scrubbed one back.

Chat: message content (strings, text and refusal parts, every role), message ``name`` and
``refusal``, tool-call and function-call arguments, tool and function definitions (the
description and every string of the parameters' schema that is not structure: ``type``,
``$ref``, ``required``, ... are left alone), the ``prediction``, the ``response_format``
JSON schema's description and strings, ``stop`` sequences, ``metadata`` keys and values, and
``user``.
Embeddings: the input, as strings or as token arrays (decoded with the model's tokenizer,
scrubbed, encoded again when anything was found), ``metadata`` and ``user``.

Each text is a ``Slot`` of one kind, which decides how a scrubbed text goes back:

* ``text``: as it is;
* ``name``: a participant name (``messages[].name``): providers accept only some characters
  there (OpenAI: no whitespace, ``<``, ``>``, ``|``, ``\\``, ``/``), so a placeholder's
  ``<EMAIL_1>`` becomes ``_EMAIL_1_``;
* ``key``: a ``metadata`` key, renamed in place (order kept; a clash gets a suffix);
* ``tokens``: a token array, encoded again with the tokenizer it was decoded with;
* ``ident``: a tool or function name. The model calls tools by these names, and the client
  matches the calls by them: a rewritten name breaks tool calling silently, so personal data
  in one refuses the request (``scrub`` raises) instead.

Keys the gateway itself reads from ``metadata`` (``agent``, ``workflow``, ``customer``,
``tags``: attribution; rule conditions) are read from the body as the client sent it, before
this stage, and never from the scrubbed copy: scrubbing their values on the way out cannot
break attribution or routing, and those key names hold no personal data to be renamed.
"""

from __future__ import annotations

import os
import re
from functools import cache
from typing import Any

TEXT, NAME, KEY, TOKENS, IDENT = "text", "name", "key", "tokens", "ident"

# Schema keys whose string values are structure, not prose.
_STRUCTURE = frozenset({"type", "$ref", "$schema", "$id", "$anchor", "format", "pattern", "required", "const"})
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_\-.]")
_OFFLINE_ENCODINGS = ("cl100k_base", "o200k_base")  # the BPE files bundled with litellm


class Undecodable(ValueError):
    """A token array that cannot be read back into text with a tokenizer the gateway has."""


class Slot:
    """A text inside the body: where it is (for error messages) and how to replace it."""

    __slots__ = ("encoding", "holder", "key", "kind", "path", "text")

    def __init__(self, path: str, holder: Any, key: Any, kind: str = TEXT, text: str | None = None, encoding=None):
        self.path, self.holder, self.key, self.kind, self.encoding = path, holder, key, kind, encoding
        self.text: str = holder[key] if text is None else text

    def put(self, new: str) -> None:
        """Writes the scrubbed text where this slot is (in the body's copy)."""
        if self.kind == TEXT:
            self.holder[self.key] = new
        elif self.kind == NAME:
            self.holder[self.key] = _NOT_IN_NAME.sub("_", new)[:64]
        elif self.kind == TOKENS:
            self.holder[self.key] = self.encoding.encode(new, disallowed_special=())
        elif self.kind == KEY:
            _rename(self.holder, self.key, new)
        else:
            raise AssertionError(f"a {self.kind} slot is never rewritten")


def _rename(d: dict, old: str, new: str) -> None:
    if new == old:
        return
    while new in d:
        new += "_"
    items = list(d.items())
    d.clear()
    d.update((new if k == old else k, v) for k, v in items)


def slots(body: dict, endpoint: str, tokens: list | None = None) -> list[Slot]:
    """The texts of ``body`` that leave, in a fixed order (placeholders are numbered by first
    appearance). ``tokens``: the decoded token arrays of an embeddings input, from
    ``token_slots``."""
    out: list[Slot] = []
    if endpoint == "embeddings":
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(Slot("input", body, "input"))
        elif isinstance(inp, list):
            out.extend(Slot(f"input[{i}]", inp, i) for i, v in enumerate(inp) if isinstance(v, str))
        out.extend(tokens or ())
    elif endpoint == "rerank":  # gateway/rerank.py: the query and every document leave
        if isinstance(body.get("query"), str):
            out.append(Slot("query", body, "query"))
        for i, doc in enumerate(body.get("documents") or ()):
            if isinstance(doc, str):
                out.append(Slot(f"documents[{i}]", body["documents"], i))
            elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
                out.append(Slot(f"documents[{i}].text", doc, "text"))
    else:
        _chat(body, out)
    meta = body.get("metadata")
    if isinstance(meta, dict):  # paths by position: a key may itself be personal data
        keys = list(meta)
        out.extend(Slot(f"metadata[{i}]", meta, k) for i, k in enumerate(keys) if isinstance(meta[k], str))
        out.extend(Slot(f"metadata[{i}].key", meta, k, KEY, text=k) for i, k in enumerate(keys))
    if isinstance(body.get("user"), str):
        out.append(Slot("user", body, "user"))
    return out


def _chat(body: dict, out: list[Slot]) -> None:
    for i, msg in enumerate(body.get("messages") or ()):
        if not isinstance(msg, dict):
            continue
        p = f"messages[{i}]"
        content = msg.get("content")
        if isinstance(content, str):
            out.append(Slot(f"{p}.content", msg, "content"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict):
                    for field in ("text", "refusal"):
                        if isinstance(part.get(field), str):
                            out.append(Slot(f"{p}.content[{j}].{field}", part, field))
        if isinstance(msg.get("refusal"), str):
            out.append(Slot(f"{p}.refusal", msg, "refusal"))
        if isinstance(msg.get("name"), str):
            out.append(Slot(f"{p}.name", msg, "name", NAME))
        for k, call in enumerate(msg.get("tool_calls") or ()):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                _call(fn, f"{p}.tool_calls[{k}].function", out)
        if isinstance(msg.get("function_call"), dict):
            _call(msg["function_call"], f"{p}.function_call", out)
    for i, tool in enumerate(body.get("tools") or ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict):
            _definition(fn, f"tools[{i}].function", out)
    for i, fn in enumerate(body.get("functions") or ()):
        if isinstance(fn, dict):
            _definition(fn, f"functions[{i}]", out)
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        _ident(choice["function"], "tool_choice.function", out)
    if isinstance(body.get("function_call"), dict):
        _ident(body["function_call"], "function_call", out)
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        content = prediction.get("content")
        if isinstance(content, str):
            out.append(Slot("prediction.content", prediction, "content"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(Slot(f"prediction.content[{j}].text", part, "text"))
    stop = body.get("stop")  # a stop sequence leaves too (a placeholder there just never matches)
    if isinstance(stop, str):
        out.append(Slot("stop", body, "stop"))
    elif isinstance(stop, list):
        out.extend(Slot(f"stop[{i}]", stop, i) for i, v in enumerate(stop) if isinstance(v, str))
    fmt = body.get("response_format")
    schema = fmt.get("json_schema") if isinstance(fmt, dict) else None
    if isinstance(schema, dict):
        if isinstance(schema.get("description"), str):
            out.append(Slot("response_format.json_schema.description", schema, "description"))
        if isinstance(schema.get("schema"), dict):
            _schema(schema["schema"], "response_format.json_schema.schema", out)


def _call(fn: dict, path: str, out: list[Slot]) -> None:
    if isinstance(fn.get("arguments"), str):
        out.append(Slot(f"{path}.arguments", fn, "arguments"))
    _ident(fn, path, out)


def _ident(fn: dict, path: str, out: list[Slot]) -> None:
    if isinstance(fn.get("name"), str):
        out.append(Slot(f"{path}.name", fn, "name", IDENT))


def _definition(fn: dict, path: str, out: list[Slot]) -> None:
    _ident(fn, path, out)
    if isinstance(fn.get("description"), str):
        out.append(Slot(f"{path}.description", fn, "description"))
    if isinstance(fn.get("parameters"), dict):
        _schema(fn["parameters"], f"{path}.parameters", out)


def _schema(node: Any, path: str, out: list[Slot]) -> None:
    """Every prose string of a JSON schema (descriptions, titles, enum values, examples,
    defaults), depth first in document order; keys (property names) are never touched."""
    stack: list[tuple[Any, str]] = [(node, path)]
    while stack:
        node, path = stack.pop()
        children = []
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _STRUCTURE:
                    continue
                if isinstance(v, str):
                    out.append(Slot(f"{path}.{k}", node, k))
                elif isinstance(v, dict | list):
                    children.append((v, f"{path}.{k}"))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str):
                    out.append(Slot(f"{path}[{i}]", node, i))
                elif isinstance(v, dict | list):
                    children.append((v, f"{path}[{i}]"))
        stack.extend(reversed(children))


# --- token arrays -----------------------------------------------------------------------------


def has_tokens(body: dict) -> bool:
    inp = body.get("input")
    return isinstance(inp, list) and bool(inp) and not isinstance(inp[0], str)


def token_slots(body: dict, encoding) -> list[Slot]:
    """The token arrays of an embeddings input, decoded. Raises ``Undecodable``."""
    inp = body["input"]
    arrays = [(body, "input", "input")] if not isinstance(inp[0], list) else []
    if not arrays:
        arrays = [(inp, i, f"input[{i}]") for i in range(len(inp))]
    out = []
    for holder, key, path in arrays:
        try:
            text = encoding.decode_bytes(holder[key]).decode("utf-8", errors="replace")
        except (KeyError, OverflowError, TypeError, ValueError):
            raise Undecodable(path) from None
        out.append(Slot(path, holder, key, TOKENS, text=text, encoding=encoding))
    return out


def token_slots_like(body: dict, decoded: list[Slot]) -> list[Slot]:
    """``decoded`` (token slots of a body) moved onto a copy of that body, without decoding again."""
    return [
        Slot(s.path, body if s.key == "input" else body["input"], s.key, TOKENS, s.text, s.encoding) for s in decoded
    ]


def encoding_for(model: str, deployments: tuple[str, ...] = ()):
    """The tiktoken encoding of the model group a client named (the name the client tokenized
    for), else the one all its deployments' models share; None when neither is known offline."""
    name = _encoding_name(model)
    if name is None and deployments:
        names = {_encoding_name(d) for d in deployments}
        name = names.pop() if len(names) == 1 else None
    return _load(name) if name is not None else None


@cache
def _encoding_name(model: str) -> str | None:
    import tiktoken

    for candidate in (model, model.rsplit("/", 1)[-1]):
        try:
            name = tiktoken.encoding_name_for_model(candidate)
        except KeyError:
            continue
        return name if name in _OFFLINE_ENCODINGS else None
    return None


@cache
def _load(name: str):
    """A tiktoken encoding from the files bundled with litellm: never downloaded."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        from core.prices import tokenizer_dir

        folder = tokenizer_dir()
        if folder is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    import tiktoken

    return tiktoken.get_encoding(name)
