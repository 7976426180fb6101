"""Every token priced as billed: cached prompt tokens at the table's cached rate, what the
estimate expects the prompt cache to serve, and where the prompt_cache_key is sent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from docqueue.workers.batch.calls import prompt_tokens
from docqueue.workers.jobs.control import predicted_cached
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.provider import prompt_cache
from docqueue.workers.settings import DEFAULT_PRICES, Price, Settings
from docqueue.workers.tokens import count_tokens

# The published prices per million tokens: (input, cached input, output).
PUBLISHED = {
    "gpt-4o-mini": (0.15, 0.075, 0.60),
    "gpt-4o": (2.50, 1.25, 10.00),
    "gpt-4.1": (2.00, 0.50, 8.00),
    "gpt-4.1-mini": (0.40, 0.10, 1.60),
    "gpt-4.1-nano": (0.10, 0.025, 0.40),
    "gpt-5": (1.25, 0.125, 10.00),
    "gpt-5-mini": (0.25, 0.025, 2.00),
    "gpt-5-nano": (0.05, 0.005, 0.40),
}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_the_table_has_the_published_prices_with_the_cached_rate(model: str) -> None:
    price = DEFAULT_PRICES[model]
    assert (price.input_per_mtok, price.cached_input_per_mtok, price.output_per_mtok) == (
        PUBLISHED[model])


def test_cached_prompt_tokens_cost_the_cached_rate_and_the_rest_the_input_rate() -> None:
    # Given gpt-4.1's price and a call of 1,600 prompt tokens, 1,408 of them cached, 60 out
    price = DEFAULT_PRICES["gpt-4.1"]
    # Then it costs 192 x $2 + 1,408 x $0.50 + 60 x $8 per million
    assert price.cost(1600, 60, cached=1408) == pytest.approx(
        (192 * 2.00 + 1408 * 0.50 + 60 * 8.00) / 1e6, rel=1e-12)
    # and the cache saved 1,408 x ($2 - $0.50) per million
    assert price.saved(1408) == pytest.approx(1408 * 1.50 / 1e6, rel=1e-12)
    # and with nothing cached the cost is what it always was
    assert price.cost(1600, 60) == pytest.approx((1600 * 2.00 + 60 * 8.00) / 1e6, rel=1e-12)


def test_the_batch_lane_and_flex_halve_the_cached_rate_too() -> None:
    price = DEFAULT_PRICES["gpt-4o-mini"]
    assert price.cached_rate() == 0.075
    assert price.cached_rate("batch") == price.cached_rate("online", "flex") == 0.0375
    assert price.cost(1_000_000, 0, "batch", cached=1_000_000) == pytest.approx(0.0375)
    assert price.saved(1_000_000, "online", "flex") == pytest.approx(0.075 - 0.0375)


def test_a_price_without_a_cached_rate_bills_cached_tokens_as_any_input_token() -> None:
    # Given a price from DOCQ_PRICES that names no cached rate (as before this release)
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    # Then cached tokens cost the input rate: the same as before, and nothing is saved
    assert price.cost(1000, 100, cached=900) == price.cost(1000, 100)
    assert price.saved(900) == 0.0
    # and a cached count above the prompt (a confused server) is held to the prompt
    assert DEFAULT_PRICES["gpt-4.1"].cost(100, 0, cached=500) == pytest.approx(100 * 0.5 / 1e6)


def test_docq_prices_sets_the_cached_rate_of_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCQ_PRICES", json.dumps({"my-model": {
        "input_per_mtok": 1.0, "cached_input_per_mtok": 0.1, "output_per_mtok": 4.0}}))
    price = Settings().price_for("my-model")
    assert price is not None and price.cost(2000, 0, cached=1000) == pytest.approx(
        (1000 * 1.0 + 1000 * 0.1) / 1e6)


@pytest.mark.parametrize(("prefix", "cached"), [
    (0, 0), (1023, 0), (1024, 1024), (1151, 1024), (1500, 1408), (2048, 2048)])
def test_a_shared_prefix_is_cached_in_128_token_steps_from_1024(prefix: int, cached: int) -> None:
    assert prompt_cache.cacheable(prefix) == cached


INSTRUCTIONS = "Read the text below and list each person it names, with their role. " * 100


def test_the_estimate_expects_every_call_but_the_first_to_find_the_shared_prefix() -> None:
    # Given a custom pipeline whose instructions come before the text, in chat mode
    settings = Settings(llm_base_url="http://127.0.0.1:9/v1", llm_mode="chat")
    pipeline = build_pipeline("custom", {"prompt": INSTRUCTIONS + "\n<text>\n{text}\n</text>"})
    shared = prompt_cache.shared_prefix_tokens(pipeline, "chat")
    # Then the prefix is everything but the chunk and what follows it
    whole = prompt_tokens(pipeline.render("alpha", "chat"))
    assert whole - 10 < shared < whole
    # and over 20 calls, the 19 after the first find its cacheable part
    assert predicted_cached(settings, pipeline, 20) == 19 * prompt_cache.cacheable(shared) > 0
    assert predicted_cached(settings, pipeline, 1) == 0
    # but completion mode's answers carry no cached count, so none is expected there
    completion = Settings(llm_base_url="http://127.0.0.1:9/v1", llm_mode="completion")
    assert predicted_cached(completion, pipeline, 20) == 0


BUILTIN: dict[str, dict[str, Any]] = {
    "summarize": {},
    "classify": {"labels": ["billing", "bug report", "question"]},
    "extract": {"schema": {"type": "object", "properties": {"name": {"type": "string"}}}},
    "custom": {"prompt": "List the nouns of this text.\n\n{text}"},
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_every_builtin_prompt_puts_what_every_chunk_shares_first_and_the_chunk_last(
    name: str, mode: str
) -> None:
    # Given a pipeline's prompt for a chunk
    pipeline = build_pipeline(name, BUILTIN[name])
    chunk = "Ferries run every hour in summer."
    ids = prompt_cache.token_ids(pipeline.render(chunk, mode))  # type: ignore[arg-type]
    # Then all of it but the chunk and a few tokens after it (a closing tag, "Summary:") is a
    # prefix that every chunk's prompt shares: the provider can cache it
    shared = prompt_cache.shared_prefix_tokens(pipeline, mode)  # type: ignore[arg-type]
    after_chunk = len(ids) - shared - count_tokens(chunk)
    assert 0 <= after_chunk <= 6, (name, mode, after_chunk)


@pytest.mark.parametrize(("url", "setting", "sent"), [
    ("https://api.openai.com/v1", "auto", True),
    ("http://127.0.0.1:8000/v1", "auto", True),  # the simulator
    ("http://localhost:8000/v1", "auto", True),
    ("http://[::1]:8000/v1", "auto", True),
    ("https://my-proxy.example/v1", "auto", False),
    ("https://my-proxy.example/v1", "on", True),
    ("https://api.openai.com/v1", "off", False),
    (None, "auto", False),  # the local model
])
def test_the_prompt_cache_key_is_sent_where_the_endpoint_takes_it(
    url: str | None, setting: str, sent: bool
) -> None:
    settings = Settings(llm_base_url=url, llm_prompt_cache_key=setting)  # type: ignore[arg-type]
    assert settings.sends_prompt_cache_key is sent
    assert prompt_cache.cache_key(42, "summarize") == "docq-42-summarize"


def test_cached_tokens_are_read_from_raw_usage_and_from_langchain_usage_metadata() -> None:
    from docqueue.workers.provider.client import cache_read

    # OpenAI's raw usage (the lean client, the batch lane's output lines)
    assert prompt_cache.usage_cached_tokens(
        {"prompt_tokens": 1600, "prompt_tokens_details": {"cached_tokens": 1408}}) == 1408
    assert prompt_cache.usage_cached_tokens({"prompt_tokens": 1600}) == 0
    assert prompt_cache.usage_cached_tokens({"prompt_tokens_details": None}) == 0
    # langchain-openai's input_token_details, whose key carries the tier at flex and priority
    assert cache_read({"cache_read": 1408, "audio": 0}) == 1408
    assert cache_read({"flex_cache_read": 1024, "flex": 576}) == 1024
    assert cache_read({}) == 0
