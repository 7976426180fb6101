"""Deterministic replies: the same request always gets the same choices and usage.

Each choice draws from an RNG seeded by the request's fingerprint and the choice's index.
Plain text is filler words whose length is drawn from Normal(mean, sd); JSON modes produce a
value for the schema (or a small object). Any content longer than the output cap is cut to the
cap and marked finish_reason "length", as a real model's would be.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from docqueue.workers.testing.simulator import tokens
from docqueue.workers.testing.simulator.config import SimulatorConfig
from docqueue.workers.testing.simulator.protocol import ApiError, CompletionRequest
from docqueue.workers.testing.simulator.schema import SchemaError, instance
from docqueue.workers.testing.simulator.words import filler, words

SYSTEM_FINGERPRINT = "fp_docqsim"


@dataclass(frozen=True)
class Choice:
    content: str
    completion_tokens: int
    finish_reason: str
    tool_name: str | None = None


@dataclass(frozen=True)
class Reply:
    """A complete success body and the numbers the server needs from it."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    longest_choice_tokens: int


def draw_length(rng: random.Random, mean: float, sd: float) -> int:
    """An output length in tokens: Normal(mean, sd), rounded, at least 1."""
    return max(1, round(rng.gauss(mean, sd)))


def cut(text: str, cap: int) -> tuple[str, int, bool]:
    """`text` cut to at most `cap` tokens: (text, its token count, whether it was cut)."""
    ids = tokens.encode(text)
    if len(ids) <= cap:
        return text, len(ids), False
    kept = tokens.decode(ids[:cap])
    return kept, tokens.count_text(kept), True


def make_choice(req: CompletionRequest, config: SimulatorConfig, index: int) -> Choice:
    """The `index`-th choice of the reply to `req`."""
    rng = random.Random(f"{req.fingerprint}:{index}")
    cap = req.output_cap(config.default_max_tokens)
    if req.tool is not None:
        arguments = _json_text(req.tool.parameters, rng, "tools[].function.parameters")
        text, used, was_cut = cut(arguments, cap)
        return Choice(text, used, "length" if was_cut else "tool_calls", req.tool.name)
    kind = req.response_format.kind
    if kind == "json_schema":
        text = _json_text(req.response_format.schema, rng, "response_format.json_schema.schema")
    elif kind == "json_object":
        text = json.dumps(
            {
                "answer": " ".join(words(rng, rng.randint(3, 8))),
                "confidence": round(rng.random(), 2),
            }
        )
    else:
        return _text_choice(req, config, rng, cap)
    text, used, was_cut = cut(text, cap)
    return Choice(text, used, "length" if was_cut else "stop")


def _text_choice(
    req: CompletionRequest, config: SimulatorConfig, rng: random.Random, cap: int
) -> Choice:
    drawn = draw_length(rng, config.output_tokens_mean, config.output_tokens_sd)
    text, used, _ = cut(filler(rng, min(drawn, cap)), min(drawn, cap))
    finish = "length" if drawn > cap else "stop"
    stops = [i for i in (text.find(s) for s in req.stop) if i >= 0]
    if stops:
        text = text[: min(stops)]
        used, finish = tokens.count_text(text), "stop"
    return Choice(text, used, finish)


def _json_text(schema: Any, rng: random.Random, param: str) -> str:
    try:
        value = instance(schema, rng)
    except SchemaError as exc:
        raise ApiError(
            400,
            f"the simulator cannot make a value for this schema: {exc}",
            param=param,
            code="invalid_value",
        ) from exc
    return json.dumps(value)


def build_reply(req: CompletionRequest, config: SimulatorConfig, created_s: int) -> Reply:
    """The whole success body for `req`. Raises ApiError (400) for an unusable schema."""
    choices = [make_choice(req, config, i) for i in range(req.choices)]
    completion = sum(c.completion_tokens for c in choices)
    usage = {
        "prompt_tokens": req.total_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": req.total_prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0},  # set by the server's prefix cache
    }
    if req.endpoint == "chat":
        body: dict[str, Any] = {
            "id": f"chatcmpl-{random.getrandbits(96):024x}",
            "object": "chat.completion",
            "created": created_s,
            "model": req.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [_chat_choice(i, c) for i, c in enumerate(choices)],
            "usage": usage,
        }
    else:
        body = {
            "id": f"cmpl-{random.getrandbits(96):024x}",
            "object": "text_completion",
            "created": created_s,
            "model": req.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {"text": c.content, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(choices)
            ],
            "usage": usage,
        }
    longest = max(c.completion_tokens for c in choices)
    return Reply(body, req.total_prompt_tokens, completion, longest)


def mark_cached(reply: Reply, cached_tokens: int) -> None:
    """Say in the reply's usage how many of its prompt tokens the prefix cache served."""
    reply.body["usage"]["prompt_tokens_details"]["cached_tokens"] = cached_tokens


def _chat_choice(index: int, choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.content, "refusal": None}
    if choice.tool_name is not None:
        message["content"] = None
        message["tool_calls"] = [
            {
                "id": f"call_{random.getrandbits(96):024x}",
                "type": "function",
                "function": {"name": choice.tool_name, "arguments": choice.content},
            }
        ]
    return {
        "index": index,
        "message": message,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }
