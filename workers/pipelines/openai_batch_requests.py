"""An OpenAI Batch request body as a prompt: what a request may ask for, and what it gets.

Guarantees: `prompt_of` turns a `/v1/chat/completions` or `/v1/completions` body into the
`Prompt` the workers send, or raises `BadLine` naming the field and the problem (as the 400 the
endpoint would give); nothing the body asks for is silently dropped: a field is passed on
(`PASSED_PARAMS`, `stop`, chat `response_format`), handled (messages, prompt, max tokens, n),
ignored because it changes nothing here (`model`, `stream`, `metadata`, `store`), or refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from docqueue.workers.pipelines.base import Prompt

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
# Generation fields sent to the endpoint as they are; the endpoint checks their values.
PASSED_PARAMS = frozenset(
    {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user"}
)
HANDLED = {
    CHAT_URL: frozenset(
        {"messages", "max_tokens", "max_completion_tokens", "response_format", "stop", "n"}
    ),
    COMPLETIONS_URL: frozenset({"prompt", "max_tokens", "stop", "n", "best_of"}),
}
# Fields that change nothing here: the job's model answers, and replies are never streamed.
_IGNORED = frozenset({"model", "stream", "metadata", "store"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class BadLine(Exception):
    """Internal: one line cannot run. `status` 400 for a body problem, None for the line."""

    def __init__(
        self, code: str, problem: str, *, status: int | None = None, param: str | None = None
    ) -> None:
        super().__init__(problem)
        self.code, self.problem, self.status, self.param = code, problem, status, param


def invalid(problem: str, param: str | None, code: str = "invalid_value") -> BadLine:
    return BadLine(code, problem, status=400, param=param)


def prompt_of(url: str, body: Mapping[str, Any]) -> Prompt:
    """The Prompt that sends `body` to the endpoint at `url` (checked at read time).

    Raises:
        BadLine: the body asks for something docqueue cannot send or return.
    """
    for key in body:
        if key not in HANDLED[url] and key not in _IGNORED and key not in PASSED_PARAMS:
            raise invalid(
                f"has a body field {key!r} that docqueue does not support for {url}",
                key, "unsupported_parameter",
            )
    if body.get("stream") not in (None, False):
        raise invalid("asks for streaming; a batch request must not stream", "stream",
                       "unsupported_value")
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise invalid(f"asks for {key}={body[key]!r}; only one choice per request is "
                           "supported", key, "unsupported_value")
    params = {k: v for k, v in body.items() if k in PASSED_PARAMS}
    common: dict[str, Any] = {
        "stop": _stop(body.get("stop")),
        "max_tokens": _max_tokens(body),
        "params": params or None,
    }
    if url == CHAT_URL:
        return Prompt(messages=_messages(body.get("messages")),
                      response_format=_response_format(body.get("response_format")), **common)
    return Prompt(text=_prompt_text(body.get("prompt")), **common)


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise invalid("has a chat body without 'messages'", "messages",
                       "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        what = "an empty array" if messages == [] else kind_of(messages)
        raise invalid(f"has 'messages' that is {what}, not a list of messages", "messages",
                       "invalid_type")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"has {where} that is {kind_of(message)}, not an object", where,
                           "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise invalid(f"has {where} with role {json.dumps(role)}; supported roles: "
                           f"{', '.join(_ROLES)}", f"{where}.role")
        out.append({"role": _ROLES[role], "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise invalid(f"has {where}.content that is {kind_of(content)}, not a string or a list "
                       "of text parts", f"{where}.content", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
            part.get("text"), str
        ):
            kind = part.get("type") if isinstance(part, dict) else None
            shown = f"a part of type {kind!r}" if isinstance(kind, str) else kind_of(part)
            raise invalid(f"has {where}.content[{j}] that is {shown}; only text parts are "
                           "supported", f"{where}.content[{j}]", "unsupported_value")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a list of one prompt is that prompt
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise invalid("has a completion body without a 'prompt'", "prompt",
                       "missing_required_parameter")
    what = "a list of several prompts" if isinstance(prompt, list) else kind_of(prompt)
    raise invalid(f"has a 'prompt' that is {what}; each request must hold one string prompt",
                   "prompt", "unsupported_value")


def _stop(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("has a 'stop' that is not a string or a list of strings", "stop",
                       "invalid_type")
    return stops or None


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid(f"has {key}={value!r}; it must be a positive integer", key)
        return value
    return None


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("has a 'response_format' that is not an object with a 'type'",
                       "response_format", "invalid_type")
    return value


def kind_of(value: object) -> str:
    """A JSON name for the type of `value`, with its article."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list) else "an object")
