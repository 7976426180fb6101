"""The simulator's replies and request checks, without a server."""

from __future__ import annotations

import json
import random
import statistics
from typing import Any

import pytest

from docqueue.workers.testing.simulator import main
from docqueue.workers.testing.simulator.config import ConfigError, SimulatorConfig
from docqueue.workers.testing.simulator.generate import build_reply
from docqueue.workers.testing.simulator.protocol import ApiError, parse
from docqueue.workers.testing.simulator.tokens import count_messages, count_text
from docqueue.workers.testing.simulator.words import filler

CONFIG = SimulatorConfig()


def chat(content: str = "Summarize the report.", **fields: Any) -> dict[str, Any]:
    return {"model": "docq-sim", "messages": [{"role": "user", "content": content}], **fields}


def reply_body(body: dict[str, Any], config: SimulatorConfig = CONFIG) -> dict[str, Any]:
    endpoint = "chat" if "messages" in body else "text"
    return build_reply(parse(body, endpoint), config, created_s=1).body


def test_same_request_same_reply_different_prompt_different_reply() -> None:
    # Given two identical requests and a third with another prompt
    first = reply_body(chat())
    second = reply_body(chat())
    other = reply_body(chat("Summarize the budget."))
    # Then the identical ones agree on content and usage, the other differs
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]


def test_usage_is_tiktoken_counts_of_prompt_and_reply() -> None:
    # Given a chat request with a system and a user message
    body = chat("What changed this quarter?")
    body["messages"].insert(0, {"role": "system", "content": "You are terse."})
    # When it is answered
    out = reply_body(body)
    # Then usage counts the messages (with framing) and the reply text exactly
    content = out["choices"][0]["message"]["content"]
    assert out["usage"] == {
        "prompt_tokens": count_messages(body["messages"]),
        "completion_tokens": count_text(content),
        "total_tokens": count_messages(body["messages"]) + count_text(content),
        "prompt_tokens_details": {"cached_tokens": 0},  # the server's prefix cache sets it
    }
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["finish_reason"] == "stop"


def test_filler_is_exactly_the_asked_number_of_tokens() -> None:
    # When filler of random lengths is made
    for seed in range(500):
        rng = random.Random(seed)
        wanted = rng.randint(1, 400)
        # Then tiktoken counts exactly that many tokens
        assert count_text(filler(rng, wanted)) == wanted


def test_lengths_follow_the_configured_distribution() -> None:
    # Given a mean of 40 tokens and a spread of 10
    config = SimulatorConfig(output_tokens_mean=40, output_tokens_sd=10)
    # When 300 different prompts are answered
    lengths = [
        reply_body(chat(f"prompt {i}"), config)["usage"]["completion_tokens"] for i in range(300)
    ]
    # Then the lengths centre on 40 with about that spread
    assert 37 <= statistics.mean(lengths) <= 43
    assert 7 <= statistics.stdev(lengths) <= 13


def test_max_tokens_cuts_the_reply_with_finish_reason_length() -> None:
    # Given replies of about 60 tokens
    full = reply_body(chat())
    # When max_tokens is 5
    cut = reply_body(chat(max_tokens=5))
    # Then the reply is the first 5 tokens of the same text, marked "length"
    assert cut["usage"]["completion_tokens"] == 5
    assert cut["choices"][0]["finish_reason"] == "length"
    assert full["choices"][0]["message"]["content"].startswith(
        cut["choices"][0]["message"]["content"]
    )


def test_stop_sequence_ends_the_text() -> None:
    # Given the reply's text, and its second word as a stop sequence
    text = reply_body(chat())["choices"][0]["message"]["content"]
    stop = " " + text.split()[1]
    # When the same request asks to stop there
    out = reply_body(chat(stop=[stop]))
    # Then the text ends before it
    assert out["choices"][0]["message"]["content"] == text.split()[0]


def test_completions_with_several_prompts_and_n() -> None:
    # Given two prompts and n=3
    out = reply_body({"model": "docq-sim", "prompt": ["one", "two words"], "n": 3})
    # Then there are six text choices indexed 0..5 and the prompt counted once per prompt
    assert out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert out["usage"]["prompt_tokens"] == count_text("one") + count_text("two words")


def test_json_object_mode_replies_with_an_object() -> None:
    out = reply_body(chat(response_format={"type": "json_object"}))
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


def test_forced_tool_call_carries_arguments_for_its_schema() -> None:
    # Given a tool whose arguments need an integer "n"
    params = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = chat(
        tools=[{"type": "function", "function": {"name": "f", "parameters": params}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
    )
    # When answered
    choice = reply_body(body)["choices"][0]
    # Then the reply calls f with an integer n
    call = choice["message"]["tool_calls"][0]["function"]
    assert choice["finish_reason"] == "tool_calls" and call["name"] == "f"
    assert isinstance(json.loads(call["arguments"])["n"], int)


@pytest.mark.parametrize(
    ("body", "param", "code", "words"),
    [
        ([1, 2], None, None, "must be a JSON object, got an array"),
        ({"messages": []}, "model", "missing_required_parameter", "'model'"),
        ({"model": "m"}, "messages", "missing_required_parameter", "'messages'"),
        ({"model": "m", "messages": "hi"}, "messages", "invalid_type", "expected an array"),
        ({"model": 3, "messages": []}, "model", "invalid_type", "expected a string"),
        (
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
            "got 'robot'",
        ),
        ({**chat(), "max_tokens": "ten"}, "max_tokens", "invalid_type", "expected an integer"),
        ({**chat(), "max_tokens": 0}, "max_tokens", "invalid_value", "at least 1"),
        ({**chat(), "n": 0}, "n", "invalid_value", "between 1 and 128"),
        ({**chat(), "temperature": True}, "temperature", "invalid_type", "got a boolean"),
        ({**chat(), "stream": True}, "stream", "unsupported_parameter", "not supported"),
        (
            {**chat(), "response_format": {"type": "json_schema"}},
            "response_format.json_schema.schema",
            None,
            "needs json_schema.schema",
        ),
    ],
)
def test_bad_chat_requests_name_the_field(
    body: Any, param: str | None, code: str | None, words: str
) -> None:
    # When a malformed chat request is checked
    with pytest.raises(ApiError) as caught:
        parse(body, "chat")
    # Then it is a 400 naming the field and the problem
    error = caught.value
    assert (error.status, error.param, error.code) == (400, param, code)
    assert words in error.message


def test_completion_prompt_must_be_text_or_token_ids() -> None:
    with pytest.raises(ApiError, match=r"prompt\[1\] must be a string or an array of token ids"):
        parse({"model": "m", "prompt": ["ok", {"x": 1}]}, "text")


def test_unusable_schema_is_a_400_on_the_schema() -> None:
    # Given a schema no value satisfies
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
    }
    # When the reply is built
    with pytest.raises(ApiError) as caught:
        reply_body(chat(response_format=fmt))
    # Then the client is told the schema is the problem
    assert caught.value.status == 400
    assert caught.value.param == "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"fail_rate": 1.5}, "--fail-rate: must be between 0 and 1"),
        ({"fail_rate": 0.6, "garbage_rate": 0.6}, "must not exceed 1"),
        ({"rpm": 0}, "--rpm: must be a positive integer"),
        ({"latency_ms": -1.0}, "--latency-ms: must not be negative"),
        ({"models": ("",)}, "--model: a model name must not be empty"),
    ],
)
def test_bad_options_are_named(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        SimulatorConfig(**fields)


def test_api_key_is_not_in_the_config_repr() -> None:
    assert "s3cret" not in repr(SimulatorConfig(api_key="s3cret"))


def test_main_rejects_bad_options_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    # When the command line has an out-of-range and then a mistyped option
    assert main(["--timeout-rate", "2"]) == 2
    assert main(["--rpm", "lots"]) == 2
    # Then each message names the option
    err = capsys.readouterr().err
    assert "--timeout-rate: must be between 0 and 1" in err
    assert "--rpm: invalid int value: 'lots'" in err
