"""The model client: one call through langchain-openai, its usage, headers and classified errors.

This module and `batch_api.py` (the Batch API) are the only ones that catch `openai.*`
exceptions; they re-raise docqueue's own.
"""

from __future__ import annotations

import contextvars
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import openai
from httpx_aiohttp import HttpxAiohttpClient
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI

from docqueue.workers.errors import (
    AuthenticationRefusedError,
    EndpointUnreachableError,
    FlexUnavailableError,
    PermanentLLMError,
    RateLimitedError,
    RetryableLLMError,
)
from docqueue.workers.pipelines import Prompt
from docqueue.workers.provider.headers import is_rate_limit_header
from docqueue.workers.settings import LLMMode

# Statuses worth another try; every other 4xx is permanent.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529})
PERMANENT_CODES = frozenset({"insufficient_quota", "content_filter", "context_length_exceeded"})
REFUSED_KEY = {401: "refused the API key", 403: "refused access with the API key"}
FLEX_UNAVAILABLE = "resource_unavailable"

# The headers of the response being read in this asyncio task (set by `complete`).
_headers: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "docq_response_headers", default=None
)


async def _capture_headers(response: httpx.Response) -> None:
    holder = _headers.get()
    if holder is not None:
        holder.clear()
        holder.update(response.headers)


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    latency_ms: float
    headers: Mapping[str, str] = field(default_factory=dict)
    tokens_in_cached: int = 0  # of tokens_in: read from the provider's prompt cache


class LLM(Protocol):
    """What the batch processor needs from a model client."""

    async def complete(self, prompt: Prompt, *, max_tokens: int,
                       service_tier: str | None = None,
                       cache_key: str | None = None) -> Completion: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str
    mode: LLMMode
    api_key: str | None
    timeout_s: float
    temperature: float
    max_connections: int


class OpenAICompatibleLLM:
    """Calls any OpenAI-compatible endpoint in chat or completion mode; no retries of its own."""

    def __init__(self, cfg: EndpointConfig) -> None:
        self._cfg = cfg
        # httpx's API (the SDK needs it) over aiohttp's connection pool: httpcore's pool scans
        # every connection for every request, and cost 2-3 ms of CPU per call at 25 in flight
        # (benchmarks/bench_overhead.py; py-spy), half of a worker's time.
        self._http = HttpxAiohttpClient(
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)),
            limits=httpx.Limits(
                max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections
            ),
            event_hooks={"response": [_capture_headers]},
        )
        common: dict[str, Any] = {
            "model": cfg.model,
            "base_url": cfg.base_url,
            # Local servers need no key, but the SDK insists on one.
            "api_key": cfg.api_key or "no-key",
            "max_retries": 0,  # Celery and our batch loop own retries: one retry loop only
            "timeout": cfg.timeout_s,
            "temperature": cfg.temperature,
            "http_async_client": self._http,
        }
        # Both clients: a prompt with messages goes to chat, one with text to completions.
        self._chat = ChatOpenAI(**common)
        self._completion = OpenAI(**common, batch_size=1)  # one prompt per request

    async def aclose(self) -> None:
        await self._http.aclose()

    async def complete(self, prompt: Prompt, *, max_tokens: int,
                       service_tier: str | None = None,
                       cache_key: str | None = None) -> Completion:
        """Make one call, at the provider's `service_tier` and with its `prompt_cache_key` if
        they are given.

        Raises:
            RetryableLLMError: a transient failure (RateLimitedError for 429).
            PermanentLLMError: a failure retrying cannot fix.
        """
        holder: dict[str, str] = {}
        token = _headers.set(holder)
        started = time.perf_counter()
        try:
            tier: dict[str, Any] = {"service_tier": service_tier} if service_tier else {}
            if prompt.messages is not None:
                if cache_key:
                    tier["prompt_cache_key"] = cache_key
                text, finish, usage = await self._call_chat(prompt, max_tokens, tier)
            else:
                if cache_key:  # the SDK's completions call has no such argument
                    tier["extra_body"] = {"prompt_cache_key": cache_key}
                text, finish, usage = await self._call_completion(prompt, max_tokens, tier)
        except openai.APIStatusError as exc:
            raise classify_status_error(exc, self._cfg.api_key) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise transport_error(exc, self._cfg.base_url, self._cfg.timeout_s,
                                  self._cfg.api_key) from None
        except (openai.APIResponseValidationError, *MALFORMED) as exc:
            raise malformed(exc) from None
        finally:
            _headers.reset(token)
        return completed(text, finish, usage, started, holder)

    async def _call_chat(self, prompt: Prompt, max_tokens: int,
                         tier: dict[str, Any]) -> tuple[str, str | None, Usage]:
        assert prompt.messages is not None
        kwargs: dict[str, Any] = {**(prompt.params or {}), "max_tokens": max_tokens, **tier}
        if prompt.stop:
            kwargs["stop"] = prompt.stop
        if prompt.response_format:
            kwargs["response_format"] = prompt.response_format
        msg = await self._chat.ainvoke(to_messages(prompt.messages), **kwargs)
        assert isinstance(msg, AIMessage)
        usage = msg.usage_metadata or {"input_tokens": 0, "output_tokens": 0}
        finish = msg.response_metadata.get("finish_reason")
        content = msg.content if isinstance(msg.content, str) else json.dumps(msg.content)
        details = msg.usage_metadata.get("input_token_details") if msg.usage_metadata else None
        return content, finish, Usage(int(usage["input_tokens"]), int(usage["output_tokens"]),
                                      cache_read(dict(details or {})))

    async def _call_completion(
        self, prompt: Prompt, max_tokens: int, tier: dict[str, Any]
    ) -> tuple[str, str | None, Usage]:
        assert prompt.text is not None
        result = await self._completion.agenerate(
            [prompt.text], stop=prompt.stop, max_tokens=max_tokens, **(prompt.params or {}),
            **tier)
        gen = result.generations[0][0]
        # langchain-openai sums only these two counts over a completions call: the cached
        # tokens are not among them, so a completions call reports none (the lean client
        # reads them from the response).
        usage = (result.llm_output or {}).get("token_usage", {})
        finish = (gen.generation_info or {}).get("finish_reason")
        return gen.text, finish, Usage(int(usage.get("prompt_tokens", 0)),
                                       int(usage.get("completion_tokens", 0)))


@dataclass(frozen=True, slots=True)
class Usage:
    """What the provider says a call used: prompt tokens (of which `cached` were read from its
    prompt cache) and output tokens."""

    tokens_in: int
    tokens_out: int
    cached: int = 0


def cache_read(details: Mapping[str, Any]) -> int:
    """The prompt tokens read from the provider's cache, in langchain-openai's
    `input_token_details`: "cache_read", or "flex_cache_read" / "priority_cache_read" when the
    provider answered at that service tier."""
    return sum(int(v or 0) for k, v in details.items()
               if k == "cache_read" or k.endswith("_cache_read"))


# What reading a 200 whose body is not a completion raises.
MALFORMED = (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
             IndexError)


def malformed(exc: BaseException) -> RetryableLLMError:
    """A 200 whose body is not a completion: a broken proxy or server. Worth a retry."""
    what = "not JSON" if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) else (
        "JSON without a completion in it")
    return RetryableLLMError(f"malformed response from the model server ({what})",
                             code="malformed_response")


def completed(text: str, finish: str | None, usage: Usage, started: float,
              headers: Mapping[str, str]) -> Completion:
    """The call's Completion (`started` from time.perf_counter()); a filtered answer is an error.

    Raises:
        PermanentLLMError: the provider's content filter cut the answer.
    """
    if finish == "content_filter":
        raise PermanentLLMError(
            "the provider's content filter blocked this chunk", code="content_filter"
        )
    return Completion(text=text, finish_reason=finish, tokens_in=usage.tokens_in,
                      tokens_out=usage.tokens_out,
                      latency_ms=(time.perf_counter() - started) * 1000, headers=headers,
                      tokens_in_cached=min(usage.cached, usage.tokens_in))


def to_messages(messages: list[dict[str, str]]) -> list[BaseMessage]:
    kinds: dict[str, type[BaseMessage]] = {
        "system": SystemMessage,
        "user": HumanMessage,
        "assistant": AIMessage,
    }
    return [kinds[m["role"]](content=m["content"]) for m in messages]


def scrub(text: str, secret: str | None) -> str:
    """Remove a secret from text that came back from the provider or the network."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[key]")
    return text


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The provider's own wait: retry-after-ms wins over retry-after (seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP date: rare from model providers; fall back to our backoff
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every cause or context under it, outermost first."""
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def transport_error(
    exc: BaseException, base_url: str, timeout_s: float, secret: str | None
) -> RetryableLLMError:
    """What went wrong on the way to the endpoint, in words, from the SDK's error and its causes.

    The SDK reports every transport failure as a connection error or a timeout, and the HTTP
    layer under it sometimes files a refused connection under "timeout"; the causes say which
    it was. A connection that was never made is `EndpointUnreachableError` (nothing was sent,
    nothing charged); one cut after the request went out, or a real timeout, is an attempt.
    """
    chain = _chain(exc)
    for node in chain:
        if isinstance(node, ConnectionRefusedError):
            return EndpointUnreachableError(
                f"could not connect to {base_url} (connection refused)", code="connection_refused")
        if isinstance(node, socket.gaierror):
            host = urlsplit(base_url).hostname or base_url
            reason = node.strerror or str(node)
            return EndpointUnreachableError(
                f"could not connect to {base_url} (cannot resolve host {host}: {reason})",
                code="dns_failure")
    for node in chain:
        if isinstance(node, ConnectionResetError | BrokenPipeError) or type(node).__name__ in (
                "ServerDisconnectedError", "RemoteProtocolError", "ClientPayloadError"):
            return RetryableLLMError(
                f"the connection to {base_url} was closed before the response was complete",
                code="connection_reset")
    if isinstance(exc, openai.APITimeoutError) or any(
            isinstance(node, TimeoutError | httpx.TimeoutException) for node in chain):
        return RetryableLLMError(
            f"the model at {base_url} did not answer within {timeout_s:g} s "
            "(DOCQ_LLM_TIMEOUT_S)", code="timeout")
    reason = scrub(str(chain[-1]) or type(chain[-1]).__name__, secret)
    return RetryableLLMError(f"could not connect to {base_url}: {reason}",
                             code="connection_error")


def classify_status_error(
    exc: openai.APIStatusError, api_key: str | None
) -> RetryableLLMError | PermanentLLMError:
    return classify_status(exc.status_code, exc.body, exc.response.headers, exc.message, api_key)


def classify_status(
    status: int, body: object, headers: Mapping[str, str], fallback: str, api_key: str | None
) -> RetryableLLMError | PermanentLLMError:
    """The error an HTTP status and its body (OpenAI's error shape, or anything) stand for."""
    body = body if isinstance(body, dict) else {}
    err = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    code = err.get("code") or err.get("type")
    message = scrub(str(err.get("message") or fallback), api_key)
    text = f"HTTP {status}" + (f" {code}" if code else "") + f": {message}"
    if status == 429 and (code == FLEX_UNAVAILABLE or "resource unavailable" in message.lower()):
        # The flex tier has no capacity now: not our rate, and not charged. A wait, not an
        # attempt: the batch hands its chunks back, as for an endpoint that is down.
        return FlexUnavailableError(text, http_status=status, code=FLEX_UNAVAILABLE)
    budget = {k: str(v) for k, v in headers.items() if is_rate_limit_header(k)}
    if status == 429 and code != "insufficient_quota":
        return RateLimitedError(text, http_status=status, code=code,
                                retry_after_s=retry_after_s(headers), rate_headers=budget)
    if status in RETRYABLE_STATUSES and code not in PERMANENT_CODES:
        return RetryableLLMError(text, http_status=status, code=code,
                                 retry_after_s=retry_after_s(headers), rate_headers=budget)
    if status in REFUSED_KEY:
        return AuthenticationRefusedError(f"the endpoint {REFUSED_KEY[status]} ({text})",
                                          http_status=status, code=code)
    return PermanentLLMError(text, http_status=status, code=code)
