"""Validation of client request bodies, with OpenAI's wording and the offending field named.

Hand-written rather than a schema library: it runs on every request, checks only what the
gateway or a translation relies on, and leaves unknown fields alone (they pass through).
"""

from __future__ import annotations

from typing import Any

from core.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SERVICE_TIERS = ("auto", "default", "flex")  # priced at or below the list price
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a decimal",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_got(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _bad_value(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(body: dict, name: str, lo: float, hi: float, integer: bool = False) -> None:
    v = body.get(name)
    if v is None:
        return
    if integer and not _is_int(v):
        raise _bad_type(name, "an integer", v)
    if not integer and not _is_num(v):
        raise _bad_type(name, "a decimal", v)
    if v < lo or v > hi:
        raise _bad_value(name, f"must be between {lo:g} and {hi:g}, got {v}.")


def _typed(body: dict, name: str, kind: type) -> None:
    v = body.get(name)
    if v is None:
        return
    ok = (_is_int(v) if kind is int else isinstance(v, kind)) and (kind is bool or not isinstance(v, bool))
    if not ok:
        raise _bad_type(name, _TYPE_NAMES[kind], v)


def require_model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    if not model:
        raise _bad_value("model", "must not be empty.")
    return model


def _content_parts(parts: list, where: str) -> None:
    for j, part in enumerate(parts):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad_type(p, "an object", part)
        kind = part.get("type")
        if not isinstance(kind, str):
            raise _missing(f"{p}.type") if kind is None else _bad_type(f"{p}.type", "a string", kind)
        if kind == "text" and not isinstance(part.get("text"), str):
            raise _bad_type(f"{p}.text", "a string", part.get("text"))
        if kind == "image_url":
            img = part.get("image_url")
            if not isinstance(img, dict) or not isinstance(img.get("url"), str):
                raise _bad_type(
                    f"{p}.image_url.url", "a string", (img or {}).get("url") if isinstance(img, dict) else img
                )


def _tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise _bad_type(where, "an array", calls)
    for j, call in enumerate(calls):
        p = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise _bad_type(p, "an object", call)
        if not isinstance(call.get("id"), str):
            raise _bad_type(f"{p}.id", "a string", call.get("id"))
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _bad_type(f"{p}.function", "an object", fn)
        if not isinstance(fn.get("name"), str):
            raise _bad_type(f"{p}.function.name", "a string", fn.get("name"))
        if not isinstance(fn.get("arguments"), str):
            raise _bad_type(f"{p}.function.arguments", "a string", fn.get("arguments"))


def _messages(messages: Any) -> None:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array", messages)
    if not messages:
        raise _bad_value("messages", "must contain at least one message.")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad_type(where, "an object", msg)
        role = msg.get("role")
        if role is None:
            raise _missing(f"{where}.role")
        if not isinstance(role, str):  # (a list or an object cannot be looked up in ROLES)
            raise _bad_type(f"{where}.role", "a string", role)
        if role not in ROLES:
            raise _bad_value(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}.")
        content = msg.get("content")
        if isinstance(content, list):
            _content_parts(content, f"{where}.content")
        elif content is None:
            if role != "assistant" or not (msg.get("tool_calls") or msg.get("function_call")):
                raise _missing(f"{where}.content")
        elif not isinstance(content, str):
            raise _bad_type(f"{where}.content", "a string or an array of content parts", content)
        if msg.get("tool_calls") is not None:
            _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            raise (
                _missing(f"{where}.tool_call_id")
                if msg.get("tool_call_id") is None
                else _bad_type(f"{where}.tool_call_id", "a string", msg.get("tool_call_id"))
            )


def _tools(body: dict) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad_type("tools", "an array", tools)
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise _bad_type(f"tools[{i}]", "an object", tool)
            fn = tool.get("function")
            if tool.get("type", "function") == "function":
                if not isinstance(fn, dict):
                    raise (
                        _missing(f"tools[{i}].function")
                        if fn is None
                        else _bad_type(f"tools[{i}].function", "an object", fn)
                    )
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise _bad_type(f"tools[{i}].function.name", "a string", fn.get("name"))
                if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                    raise _bad_type(f"tools[{i}].function.parameters", "an object", fn["parameters"])
    choice = body.get("tool_choice")
    if choice is not None:
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise _bad_value("tool_choice", "must be 'none', 'auto', 'required' or an object.")
        elif isinstance(choice, dict):
            fn = choice.get("function")
            named = choice.get("type") == "function" or fn is not None  # (a function, with or without type)
            if named and (not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
                raise _missing("tool_choice.function.name")
        else:
            raise _bad_type("tool_choice", "a string or an object", choice)


def validate_chat(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    require_model(body)
    _messages(body.get("messages"))
    _typed(body, "stream", bool)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad_type("stream_options", "an object", opts)
        if opts.get("include_usage") is not None and not isinstance(opts["include_usage"], bool):
            raise _bad_type("stream_options.include_usage", "a boolean", opts["include_usage"])
    _number(body, "n", 1, 128, integer=True)
    _number(body, "max_tokens", 1, 10_000_000, integer=True)
    _number(body, "max_completion_tokens", 1, 10_000_000, integer=True)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _number(body, "top_logprobs", 0, 20, integer=True)
    _number(body, "seed", -(2**63), 2**63 - 1, integer=True)
    _typed(body, "logprobs", bool)
    _typed(body, "user", str)
    _typed(body, "metadata", dict)
    _typed(body, "logit_bias", dict)
    _typed(body, "parallel_tool_calls", bool)
    tier = body.get("service_tier")
    if tier is not None and tier not in _SERVICE_TIERS:
        # a dearer tier (priority, scale) is billed above the list price the gateway prices
        # requests and holds budgets at: a client could spend past a hard budget
        raise _bad_value("service_tier", f"must be one of {', '.join(_SERVICE_TIERS)}.")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad_type("stop", "a string or an array of strings", stop)
        if len(stop) > 4:
            raise _bad_value("stop", "at most 4 stop sequences are allowed.")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise _bad_type("response_format", "an object", fmt)
        if fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad_value("response_format.type", "must be 'text', 'json_object' or 'json_schema'.")
        if fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
            raise _missing("response_format.json_schema")
    _tools(body)


def validate_embeddings(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    require_model(body)
    inp = body.get("input")
    if inp is None:
        raise _missing("input")
    if isinstance(inp, str):
        if not inp:
            raise _bad_value("input", "must not be empty.")
    elif isinstance(inp, list):
        if not inp:
            raise _bad_value("input", "must not be empty.")
        first = inp[0]
        if isinstance(first, str):
            if not all(isinstance(s, str) and s for s in inp):
                raise _bad_type("input", "a string or an array of non-empty strings", inp)
        elif _is_int(first):
            if not all(_is_int(t) for t in inp):
                raise _bad_type("input", "an array of token integers", inp)
        elif isinstance(first, list):
            if not all(isinstance(t, list) and t and all(_is_int(x) for x in t) for t in inp):
                raise _bad_type("input", "an array of token arrays", inp)
        else:
            raise _bad_type("input", "a string or an array", first)
        if len(inp) > 2048:
            raise _bad_value("input", "at most 2048 inputs per request.")
    else:
        raise _bad_type("input", "a string or an array", inp)
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad_value("encoding_format", "must be 'float' or 'base64'.")
    _number(body, "dimensions", 1, 65_536, integer=True)
    _typed(body, "user", str)
