"""The OpenAI request shapes the simulator accepts, checked into plain dataclasses.

Every problem becomes an `ApiError` with OpenAI's error shape; unknown fields are ignored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from docqueue.workers.testing.simulator import tokens

Endpoint = Literal["chat", "text"]
FormatKind = Literal["text", "json_object", "json_schema"]
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_N = 128
MAX_STOP = 4


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ResponseFormat:
    kind: FormatKind
    schema: Any = None


@dataclass(frozen=True)
class ToolChoice:
    """A function the reply must call, with the JSON schema of its arguments."""

    name: str
    parameters: Any


@dataclass(frozen=True)
class CompletionRequest:
    """One checked request to /v1/chat/completions ("chat") or /v1/completions ("text")."""

    endpoint: Endpoint
    model: str
    # Prompt tokens per prompt: one entry for chat, one per prompt for completions.
    prompt_tokens: tuple[int, ...]
    max_tokens: int | None
    n: int
    stop: tuple[str, ...]
    response_format: ResponseFormat
    tool: ToolChoice | None
    fingerprint: int = field(repr=False)
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    # The messages (chat) or the prompt field (text) as sent: the prefix cache reads them.
    prompt_part: Any = field(default=None, repr=False, compare=False)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(self.prompt_tokens)

    @property
    def choices(self) -> int:
        """Choices in the reply: n for each prompt."""
        return self.n * len(self.prompt_tokens)

    def prompt_sequences(self) -> list[list[int]]:
        """Each prompt as the token sequence the prefix cache compares."""
        if self.endpoint == "chat":
            return [tokens.messages_ids(self.prompt_part)]
        return [tokens.prompt_ids(p) for p in _prompts(self.prompt_part)]

    def output_cap(self, default_max_tokens: int) -> int:
        """The most tokens one choice may have: max_tokens, or the simulator's default."""
        return self.max_tokens if self.max_tokens is not None else default_max_tokens

    def budget_cost(self, default_max_tokens: int) -> int:
        """Tokens charged at admission: the prompt plus the output cap of every choice."""
        return self.total_prompt_tokens + self.output_cap(default_max_tokens) * self.choices


def parse(body: Any, endpoint: Endpoint) -> CompletionRequest:
    """Check a decoded JSON body. Raises ApiError (400) naming the field and the problem."""
    if not isinstance(body, dict):
        raise _invalid(None, f"the request body must be a JSON object, got {_kind(body)}")
    model = _require(body, "model", str, "a string")
    if endpoint == "chat":
        messages = _require(body, "messages", list, "an array")
        _check_messages(messages)
        counts: tuple[int, ...] = (tokens.count_messages(messages),)
        prompt_part: Any = messages
    else:
        prompt_part = _require(body, "prompt", (str, list), "a string or an array")
        counts = tuple(tokens.count_prompt(p) for p in _prompts(prompt_part))
    if body.get("stream") is True:
        raise _invalid(
            "stream",
            "streaming is not supported by the simulator; send stream=false or leave it out",
            code="unsupported_parameter",
        )
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        _optional(body, name, (int, float), "a number")
    _optional(body, "seed", int, "an integer")
    _optional(body, "user", str, "a string")
    return CompletionRequest(
        endpoint=endpoint,
        model=model,
        prompt_tokens=counts,
        max_tokens=_max_tokens(body),
        n=_n(body),
        stop=_stop(body),
        response_format=_response_format(body.get("response_format")),
        tool=_tool_choice(body) if endpoint == "chat" else None,
        fingerprint=_fingerprint(endpoint, model, prompt_part, body),
        service_tier=_optional(body, "service_tier", str, "a string"),
        prompt_cache_key=_optional(body, "prompt_cache_key", str, "a string"),
        prompt_part=prompt_part,
    )


def _check_messages(messages: list[Any]) -> None:
    if not messages:
        raise _invalid("messages", "'messages' must contain at least one message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(
                where, f"{where} must be an object, got {_kind(message)}", "invalid_type"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _invalid(
                f"{where}.role",
                f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}",
                "invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _invalid(
                f"{where}.content",
                f"{where}.content must be a string or an array of parts, got {_kind(content)}",
                "invalid_type",
            )


def _prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise _invalid("prompt", "'prompt' must not be an empty array")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [prompt]
    out: list[str | list[int]] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str) or (
            isinstance(item, list) and all(isinstance(t, int) for t in item)
        ):
            out.append(item)
        else:
            raise _invalid(
                "prompt",
                f"prompt[{i}] must be a string or an array of token ids, got {_kind(item)}",
                "invalid_type",
            )
    return out


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _optional(body, name, int, "an integer")
        if value is not None:
            if value < 1:
                raise _invalid(name, f"'{name}' must be at least 1, got {value}", "invalid_value")
            return int(value)
    return None


def _n(body: Mapping[str, Any]) -> int:
    n = _optional(body, "n", int, "an integer")
    if n is None:
        return 1
    if not 1 <= n <= MAX_N:
        raise _invalid("n", f"'n' must be between 1 and {MAX_N}, got {n}", "invalid_value")
    return int(n)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        return tuple(s for s in stop if s)
    raise _invalid(
        "stop",
        f"'stop' must be a string or up to {MAX_STOP} strings, got {_kind(stop)}",
        "invalid_type",
    )


def _response_format(value: Any) -> ResponseFormat:
    if value is None:
        return ResponseFormat("text")
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _invalid(
                "response_format.json_schema.schema",
                "response_format of type json_schema needs json_schema.schema (an object)",
            )
        return ResponseFormat("json_schema", schema)
    raise _invalid(
        "response_format.type",
        f"response_format.type must be one of text, json_object, json_schema, got {kind!r}",
        "invalid_value",
    )


def _tool_choice(body: Mapping[str, Any]) -> ToolChoice | None:
    """The function a reply must call: the one tool_choice names, or the first when "required"."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    functions = {
        t["function"]["name"]: t["function"].get("parameters", {"type": "object"})
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    }
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise _invalid("tool_choice", f"tool_choice names {name!r}, which is not in 'tools'")
        return ToolChoice(name, functions[name])
    if choice == "required" and functions:
        name = next(iter(functions))
        return ToolChoice(name, functions[name])
    return None


def _fingerprint(endpoint: Endpoint, model: str, prompt: Any, body: Mapping[str, Any]) -> int:
    """A stable hash of the fields that shape the reply.

    Not max_tokens or stop: like a real model's, they only cut the same text short.
    """
    meaningful = {
        "endpoint": endpoint,
        "model": model,
        "prompt": prompt,
        **{
            k: body.get(k)
            for k in (
                "n",
                "response_format",
                "tools",
                "tool_choice",
                "seed",
                "temperature",
                "top_p",
            )
        },
    }
    text = json.dumps(meaningful, sort_keys=True, separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _require(body: Mapping[str, Any], name: str, kind: Any, what: str) -> Any:
    if name not in body or body[name] is None:
        raise _invalid(name, f"missing required parameter: '{name}'", "missing_required_parameter")
    return _typed(body, name, kind, what)


def _optional(body: Mapping[str, Any], name: str, kind: Any, what: str) -> Any:
    return None if body.get(name) is None else _typed(body, name, kind, what)


def _typed(body: Mapping[str, Any], name: str, kind: Any, what: str) -> Any:
    value = body[name]
    if isinstance(value, bool) and kind in (int, (int, float)):
        raise _invalid(
            name, f"invalid type for '{name}': expected {what}, got a boolean", "invalid_type"
        )
    if not isinstance(value, kind):
        raise _invalid(
            name, f"invalid type for '{name}': expected {what}, got {_kind(value)}", "invalid_type"
        )
    return value


def _invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _kind(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
