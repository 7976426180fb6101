"""The lean model client: one OpenAI-compatible HTTP request over aiohttp, nothing between.

Opt-in (`DOCQ_LLM_CLIENT=lean`) for endpoints fast enough that the worker's own CPU decides the
pace: langchain-openai and the OpenAI SDK cost about 1.7 ms of CPU a call more than the request
itself when measured alone (benchmarks/bench_overhead.py), and 6-8 ms a call of a busy worker's
CPU (benchmarks/bench_limit.py, whose run with many calls in flight shows it). It sends the same
request body (chat or completions), and gives the batch processor the same Completion, the same
response headers and the same errors, worded the same, as `OpenAICompatibleLLM`: the two share
their classifiers in client.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from docqueue.workers.errors import PermanentLLMError, RetryableLLMError
from docqueue.workers.pipelines import Prompt
from docqueue.workers.provider.client import (
    MALFORMED,
    Completion,
    EndpointConfig,
    Usage,
    classify_status,
    completed,
    malformed,
    transport_error,
)
from docqueue.workers.provider.prompt_cache import usage_cached_tokens


class LeanLLM:
    """Calls any OpenAI-compatible endpoint in chat or completion mode; no retries of its own."""

    def __init__(self, cfg: EndpointConfig) -> None:
        self._cfg = cfg
        base = cfg.base_url.rstrip("/")
        self._urls = {"chat": f"{base}/chat/completions", "completion": f"{base}/completions"}
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": "docqueue"}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout_s,
                                              connect=min(10.0, cfg.timeout_s))
        self._session: aiohttp.ClientSession | None = None  # made in the loop that uses it

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._cfg.max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  headers=self._headers)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def complete(self, prompt: Prompt, *, max_tokens: int,
                       service_tier: str | None = None,
                       cache_key: str | None = None) -> Completion:
        """As `OpenAICompatibleLLM.complete`: one call, the same Completion, the same errors."""
        chat = prompt.messages is not None
        body = self.body(prompt, max_tokens, service_tier, cache_key)
        started = time.perf_counter()
        try:
            async with self._open().post(self._urls["chat" if chat else "completion"],
                                         data=json.dumps(body)) as response:
                raw = await response.read()
                status = response.status
                headers = {k.lower(): v for k, v in response.headers.items()}
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise transport_error(exc, self._cfg.base_url, self._cfg.timeout_s,
                                  self._cfg.api_key) from None
        if status >= 400:
            raise self._status_error(status, raw, headers)
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            raw_usage = answer.get("usage") or {}
            usage = Usage(int(raw_usage.get("prompt_tokens") or 0),
                          int(raw_usage.get("completion_tokens") or 0),
                          usage_cached_tokens(raw_usage) if chat else 0)
            finish = choice.get("finish_reason")
        except MALFORMED as exc:
            raise malformed(exc) from None
        if text is not None and not isinstance(text, str):
            raise malformed(TypeError())
        return completed(text or "", finish, usage, started, headers)

    def body(self, prompt: Prompt, max_tokens: int, service_tier: str | None,
             cache_key: str | None = None) -> dict[str, Any]:
        """The request body, as langchain-openai builds it for the same call (its defaults
        included: a server may read them, and the simulator's answers depend on them)."""
        body: dict[str, Any] = {"model": self._cfg.model, "temperature": self._cfg.temperature}
        if prompt.messages is not None:
            body |= {"stream": False, "messages": prompt.messages, **(prompt.params or {}),
                     "max_completion_tokens": max_tokens}
            if prompt.response_format:
                body["response_format"] = prompt.response_format
        else:
            body |= {"prompt": [prompt.text], "n": 1, "top_p": 1, "frequency_penalty": 0,
                     "presence_penalty": 0, **(prompt.params or {}), "max_tokens": max_tokens}
        if prompt.stop:
            body["stop"] = prompt.stop
        if service_tier:
            body["service_tier"] = service_tier
        if cache_key:
            body["prompt_cache_key"] = cache_key
        return body

    def _status_error(self, status: int, raw: bytes,
                      headers: dict[str, str]) -> RetryableLLMError | PermanentLLMError:
        text = raw.decode("utf-8", "replace")
        try:
            parsed: object = json.loads(text)
        except ValueError:
            parsed = None
        # The SDK's words when the body is not OpenAI's error shape.
        fallback = f"Error code: {status} - {text[:500]}"
        return classify_status(status, parsed, headers, fallback, self._cfg.api_key)
