"""OpenAI ↔ Anthropic translation, unit by unit (no I/O)."""

from __future__ import annotations

import json

import pytest

from core.errors import InvalidRequest
from core.types import Usage
from gateway.providers.anthropic_translate import StreamTranslator, from_anthropic, to_anthropic, usage_from_anthropic


def _chunks(raw: bytes) -> list:
    out = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            out.append(json.loads(event[6:]))
    return out


def test_system_and_developer_messages_become_the_system_prompt():
    req = to_anthropic(
        {
            "messages": [
                {"role": "system", "content": "A"},
                {"role": "developer", "content": [{"type": "text", "text": "B"}]},
                {"role": "user", "content": "hi"},
            ]
        },
        "claude",
        1024,
    )
    assert req["system"] == "A\n\nB"
    assert req["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert req["max_tokens"] == 1024


def test_tool_round_trip_messages():
    req = to_anthropic(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "checking",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}},
                        {"id": "c2", "type": "function", "function": {"name": "w", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "cold"},
                {"role": "tool", "tool_call_id": "c2", "content": "warm"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "w", "description": "d", "parameters": {"type": "object"}}}
            ],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        "claude",
        1024,
    )
    assert req["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "checking"},
            {"type": "tool_use", "id": "c1", "name": "w", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "c2", "name": "w", "input": {}},
        ],
    }
    # consecutive tool results merge into one user turn, as Anthropic requires
    assert req["messages"][2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "cold"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "warm"},
        ],
    }
    assert req["tools"] == [{"name": "w", "description": "d", "input_schema": {"type": "object"}}]
    assert req["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "w"}}, {"type": "tool", "name": "w"}),
    ],
)
def test_tool_choice_mapping(choice, expected):
    req = to_anthropic(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "w"}}],
        },
        "m",
        10,
    )
    assert req["tool_choice"] == expected


def test_bad_tool_arguments_name_the_field():
    with pytest.raises(InvalidRequest) as exc:
        to_anthropic(
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "w", "arguments": "{nope"}}
                        ],
                    }
                ]
            },
            "m",
            10,
        )
    assert exc.value.param == "messages[0].tool_calls[0].function.arguments"


def test_image_urls_and_data_urls():
    req = to_anthropic(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                    ],
                }
            ]
        },
        "m",
        10,
    )
    assert req["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
    ]


def test_unsupported_content_part_is_a_named_400():
    with pytest.raises(InvalidRequest) as exc:
        to_anthropic({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "m", 10)
    assert exc.value.param == "messages[0].content[0].type"


def test_sampling_and_limits():
    req = to_anthropic(
        {
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 1.5,
            "top_p": 0.5,
            "stop": "END",
            "max_completion_tokens": 77,
            "max_tokens": 5,
        },
        "m",
        10,
    )
    assert req["temperature"] == 1.0 and req["top_p"] == 0.5
    assert req["stop_sequences"] == ["END"] and req["max_tokens"] == 77


def test_response_translation_with_tools_and_usage():
    completion, usage = from_anthropic(
        {
            "id": "msg_1",
            "model": "claude",
            "stop_reason": "tool_use",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "tu_1", "name": "w", "input": {"city": "Oslo"}},
            ],
            "usage": {
                "input_tokens": 10,
                "output_tokens": 5,
                "cache_read_input_tokens": 4,
                "cache_creation_input_tokens": 2,
            },
        }
    )
    msg = completion["choices"][0]["message"]
    assert msg["content"] == "Let me look."
    assert msg["tool_calls"][0] == {
        "id": "tu_1",
        "type": "function",
        "function": {"name": "w", "arguments": '{"city":"Oslo"}'},
    }
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert completion["usage"]["prompt_tokens"] == 16 and completion["usage"]["completion_tokens"] == 5
    assert completion["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    assert usage.total_tokens == 21


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter")],
)
def test_finish_reasons(stop, finish):
    completion, _ = from_anthropic({"content": [], "stop_reason": stop})
    assert completion["choices"][0]["finish_reason"] == finish


def test_stream_translation_text_then_two_tools():
    tr = StreamTranslator(include_usage=True)
    events = [
        {"type": "message_start", "message": {"id": "msg_9", "model": "claude", "usage": {"input_tokens": 12}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "a"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"x":'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}},
        {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "t2", "name": "b"}},
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "ping"},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
    raw = b"".join(tr.feed(e["type"], e) for e in events)
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = _chunks(raw)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    tool_deltas = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [d["index"] for d in tool_deltas] == [0, 0, 0, 1, 1]
    assert tool_deltas[0]["id"] == "t1" and tool_deltas[3]["id"] == "t2"
    assert "".join(d["function"]["arguments"] for d in tool_deltas if d["index"] == 0) == '{"x":1}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 12
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert all(c["id"] == "msg_9" and c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_without_include_usage_has_no_usage_chunk():
    tr = StreamTranslator(include_usage=False)
    raw = tr.feed("message_start", {"type": "message_start", "message": {"id": "m"}})
    raw += tr.feed("message_stop", {"type": "message_stop"})
    chunks = _chunks(raw)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ({"input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 2}, (12, 4, 2)),
        ({"input_tokens": 10, "output_tokens": 4, "cache_creation_input_tokens": None}, (10, 4, 0)),
        ({"input_tokens": -10_000, "output_tokens": -4}, None),  # never a credit: estimated
        ({"input_tokens": "many", "output_tokens": 3}, None),
        ({"input_tokens": 5, "output_tokens": True}, None),
        (
            {"input_tokens": 2**40, "output_tokens": 1.5e30, "cache_creation_input_tokens": 2**40},
            (2**31 - 1,) * 2 + (0,),
        ),
        ("not an object", (0, 0, 0)),
    ],
)
def test_a_providers_usage_counts_are_billable_numbers_or_left_to_the_estimate(reported, expected):
    usage = usage_from_anthropic(reported)
    got = None if usage is None else (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    assert got == expected


def test_a_streamed_answer_with_counts_that_are_no_counts_is_marked_for_the_estimate():
    tr = StreamTranslator(include_usage=True)
    tr.feed("message_start", {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 9}}})
    tr.feed("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": -5}})
    assert tr.usage_valid is False
    ok = StreamTranslator(include_usage=True)
    ok.feed("message_start", {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 9}}})
    ok.feed("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5}})
    assert ok.usage_valid and (ok.usage.prompt_tokens, ok.usage.completion_tokens) == (9, 5)


@pytest.mark.parametrize(
    "reported",
    [
        {"prompt_tokens": -3, "completion_tokens": 2},
        {"prompt_tokens": "3"},
        {"completion_tokens": float("nan")},
        {"prompt_tokens": None, "completion_tokens": None},
    ],
)
def test_an_openai_usage_that_is_no_count_is_left_to_the_gateways_estimate(reported):
    assert Usage.from_openai(reported) is None
    got = Usage.from_openai(
        {"prompt_tokens": 2**40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2**41}}
    )
    assert (got.prompt_tokens, got.completion_tokens, got.cached_tokens) == (2**31 - 1, 3, 2**31 - 1)
