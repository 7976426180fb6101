"""The lean client (DOCQ_LLM_CLIENT=lean) answers as the langchain-openai client does.

Each case makes the same call through both clients against the provider simulator over HTTP
and compares what the batch processor reads: the text, the finish reason, the usage, the
rate-limit headers, and for a failure the error's class, code, status, wait and sentence. The
simulator's answer is a function of the request body, so equal texts also mean equal requests.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest

from docqueue.workers.errors import (
    FlexUnavailableError,
    PermanentLLMError,
    RateLimitedError,
    RetryableLLMError,
)
from docqueue.workers.pipelines import Prompt
from docqueue.workers.provider.client import LLM, EndpointConfig, OpenAICompatibleLLM
from docqueue.workers.provider.lean import LeanLLM
from docqueue.workers.testing.simulator.process import SimulatorProcess
from tests.plugins.simulator import SimulatorFactory

CLIENTS = {"langchain": OpenAICompatibleLLM, "lean": LeanLLM}
CHAT = Prompt(messages=[{"role": "system", "content": "Summarize the text."},
                        {"role": "user", "content": "The quick brown fox jumps over the dog."}])
TEXT = Prompt(text="Summarize: the quick brown fox jumps over the lazy dog.\nSummary:")
JSON_CHAT = Prompt(
    messages=[{"role": "user", "content": "Extract the animals."}],
    response_format={"type": "json_schema", "json_schema": {"name": "animals", "schema": {
        "type": "object", "properties": {"animals": {"type": "array", "items": {
            "type": "string"}}}, "required": ["animals"]}}})


def _calls(start: Callable[[], SimulatorProcess], prompts: list[Prompt], *, mode: str = "chat",
           key: str | None = None, model: str = "docq-sim", max_tokens: int = 40,
           tier: str | None = None) -> dict[str, list[Any]]:
    """Each client's outcome of each prompt in turn, on a simulator of its own (`start()`, the
    same settings and seed, so the same draws): a Completion's fields, or the error's."""

    async def run(make: Callable[[EndpointConfig], LLM], url: str) -> list[Any]:
        llm = make(EndpointConfig(base_url=url, model=model, mode=mode,  # type: ignore[arg-type]
                                  api_key=key, timeout_s=10, temperature=0.0, max_connections=4))
        outcomes: list[Any] = []
        try:
            for prompt in prompts:
                try:
                    c = await llm.complete(prompt, max_tokens=max_tokens, service_tier=tier)
                except (RetryableLLMError, PermanentLLMError) as exc:
                    # A 429's wait counts down between the two clients' calls: to the second
                    wait = getattr(exc, "retry_after_s", None)
                    outcomes.append((type(exc), exc.code, exc.http_status,
                                     None if wait is None else round(wait),
                                     re.sub(r"\d+\.\d+s\b", "N s", str(exc))))
                else:
                    limits = {k: v for k, v in c.headers.items() if k.startswith("x-ratelimit")}
                    outcomes.append((c.text, c.finish_reason, c.tokens_in, c.tokens_out,
                                     sorted(limits)))
        finally:
            await llm.aclose()
        return outcomes

    got = {}
    for name, make in CLIENTS.items():
        sim = start()
        try:
            got[name] = asyncio.run(run(make, sim.url))
        finally:
            sim.stop()
    return got


def test_answers_usage_and_headers_are_the_same(simulator: SimulatorFactory) -> None:
    def start() -> SimulatorProcess:
        return simulator("--rpm", "1000", "--tpm", "1000000", "--seed", "1")

    chat = _calls(start, [CHAT, JSON_CHAT, CHAT])
    text = _calls(start, [TEXT], mode="completion")
    cut = _calls(start, [CHAT], max_tokens=3)
    for got in (chat, text, cut):
        assert got["lean"] == got["langchain"]
    answer, finish, tokens_in, tokens_out, headers = chat["lean"][0]
    assert answer and finish == "stop" and tokens_in > 10 and tokens_out > 0
    assert "x-ratelimit-remaining-requests" in headers
    assert cut["lean"][0][1] == "length" and cut["lean"][0][3] == 3
    assert chat["lean"][1][0].startswith("{")  # the response_format reached the server


@pytest.mark.parametrize(("args", "call", "kind"), [
    (("--rpm", "1"), {"prompts": [CHAT, CHAT]}, RateLimitedError),
    (("--api-key", "sk-right-key-123"), {"key": "sk-wrong-key-456"}, PermanentLLMError),
    ((), {"model": "no-such-model"}, PermanentLLMError),
    (("--fail-rate", "1"), {"prompts": [CHAT, CHAT, CHAT]}, RetryableLLMError),
    (("--garbage-rate", "1"), {"prompts": [CHAT, CHAT, CHAT, CHAT]}, RetryableLLMError),
    (("--flex-unavailable-rate", "1"), {"tier": "flex"}, FlexUnavailableError),
], ids=["429", "bad-key", "unknown-model", "5xx", "malformed", "flex-unavailable"])
def test_failures_are_named_the_same(simulator: SimulatorFactory, args: tuple[str, ...],
                                     call: dict[str, Any], kind: type[Exception]) -> None:
    got = _calls(lambda: simulator(*args, "--seed", "3"), **({"prompts": [CHAT]} | call))
    assert got["lean"] == got["langchain"]
    failures = [o for o in got["lean"] if isinstance(o[0], type)]
    assert failures and all(issubclass(f[0], kind) for f in failures), got
    assert "sk-wrong-key-456" not in str(got)
