"""Reading x-ratelimit-* and Retry-After headers, and the limiter's input checks (no server)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from docqueue.workers.errors import RateLimitedError
from docqueue.workers.provider.admission import Limits, scope_for
from docqueue.workers.provider.client import classify_status
from docqueue.workers.provider.headers import (
    RateLimitHeaders,
    parse_duration_s,
    parse_rate_limit_headers,
    retry_after_s,
)
from docqueue.workers.provider.limiter import Limiter


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("2.5s", 2.5),
        ("1h2m3s", 3723.0),
        ("0s", 0.0),
        ("1m30.5s", 90.5),
        ("250us", 0.00025),
        ("3", 3.0),
        (" 0.75 ", 0.75),
    ],
)
def test_durations_in_every_format_providers_send(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s", "-1s", "-3", "1s2", "m1s", "nan"])
def test_unreadable_durations_are_none(text: str) -> None:
    assert parse_duration_s(text) is None


def test_rate_limit_headers_in_any_case() -> None:
    # Given OpenAI-style headers with mixed-case names and one malformed value.
    headers = {
        "X-RateLimit-Limit-Requests": "500",
        "x-ratelimit-limit-tokens": "200000",
        "X-Ratelimit-Remaining-Requests": "499",
        "x-ratelimit-remaining-tokens": "199000.0",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-reset-tokens": "later",
        "content-type": "application/json",
    }
    # When they are parsed / Then every readable value is there and the malformed one is None.
    assert parse_rate_limit_headers(headers) == RateLimitHeaders(
        limit_requests=500,
        limit_tokens=200_000,
        remaining_requests=499,
        remaining_tokens=199_000,
        reset_requests_s=0.12,
        reset_tokens_s=None,
    )
    assert parse_rate_limit_headers({"content-type": "text/plain"}).empty
    assert parse_rate_limit_headers({"x-ratelimit-limit-tokens": "0"}).empty


def test_retry_after_in_milliseconds_seconds_or_a_date() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "2"}) == 1.5
    assert retry_after_s({"Retry-After": "2"}) == 2.0
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    date = {"Retry-After": "Tue, 14 Nov 2023 22:13:50 GMT"}
    assert retry_after_s(date, now_s=now) == pytest.approx(30.0)
    assert retry_after_s({"Retry-After": "Tue, 14 Nov 2023 22:13:00 GMT"}, now_s=now) == 0.0
    assert retry_after_s({"Retry-After": "whenever"}) is None
    assert retry_after_s({"Retry-After": "-5"}) is None
    assert retry_after_s({}) is None


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"rpm": 0, "tpm": None, "max_inflight": 1}, "Limits.rpm"),
        ({"rpm": None, "tpm": 2.5, "max_inflight": 1}, "Limits.tpm"),
        ({"rpm": None, "tpm": None, "max_inflight": 0}, "Limits.max_inflight"),
        ({"rpm": None, "tpm": None, "max_inflight": 1, "period_s": 0}, "Limits.period_s"),
    ],
)
def test_bad_limits_are_named(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_bad_limiter_arguments_are_named() -> None:
    # Given a client that is never connected (no server needed to check arguments).
    client = Redis()
    limits = Limits(rpm=None, tpm=None, max_inflight=1)
    with pytest.raises(ValueError, match="scope"):
        Limiter(client, "docq:{x}", limits, slot_ttl_s=1)
    with pytest.raises(ValueError, match="slot_ttl_s"):
        Limiter(client, "docq:x", limits, slot_ttl_s=0)
    # Then a limiter's repr shows its scope and limits, nothing of the client's connection.
    assert repr(Limiter(client, "docq:x", limits, slot_ttl_s=1)).startswith("Limiter(scope=")


def test_bad_call_arguments_are_named_before_any_redis_call() -> None:
    # Given a limiter whose client points at a closed port: any Redis call would fail.
    limiter = Limiter(Redis(port=1), "docq:x", Limits(rpm=None, tpm=None, max_inflight=1),
                      slot_ttl_s=1)

    async def calls() -> None:
        with pytest.raises(ValueError, match="tokens"):
            await limiter.acquire(-1, max_wait_s=1)
        with pytest.raises(ValueError, match="max_wait_s"):
            await limiter.acquire(1, max_wait_s=float("nan"))
        with pytest.raises(ValueError, match="seconds"):
            await limiter.cool_down(-1)
        with pytest.raises(ValueError, match="cap"):
            await limiter.expected_output_tokens("k", cap=0, default=1)
        with pytest.raises(ValueError, match="output_tokens"):
            await limiter.record_output_tokens("k", -3)

    asyncio.run(calls())


def test_scopes_name_endpoint_model_and_key_without_the_endpoint_text() -> None:
    # Given the same model and key fingerprint on two endpoints (one with a trailing slash).
    one = scope_for("https://api.example.com/v1", "gpt-4o-mini", "3f2a9c1b7d4e")
    # Then the scope is the documented shape, the endpoint is hashed, and "/v1/" is "/v1".
    assert one.startswith("docq:lim:") and one.endswith(":gpt-4o-mini:3f2a9c1b7d4e")
    assert "example" not in one
    assert scope_for("https://api.example.com/v1/", "gpt-4o-mini", "3f2a9c1b7d4e") == one
    assert scope_for("http://localhost:8000/v1", "gpt-4o-mini", "3f2a9c1b7d4e") != one


def test_the_limit_period_is_a_setting_the_limiter_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given DOCQ_LLM_LIMIT_PERIOD_S unset, then set to 6 s, then to nonsense
    from pydantic import ValidationError

    from docqueue.tasks.limits import limits_for
    from docqueue.workers.settings import Settings

    monkeypatch.delenv("DOCQ_LLM_LIMIT_PERIOD_S", raising=False)
    # When the workers' limits are built / Then a minute by default, 6 s when set
    assert limits_for(Settings()).period_s == 60.0
    monkeypatch.setenv("DOCQ_LLM_LIMIT_PERIOD_S", "6")
    assert limits_for(Settings()).period_s == 6.0
    # and a period that is no positive number is refused, naming the setting
    for bad in ("0", "-1", "nan"):
        monkeypatch.setenv("DOCQ_LLM_LIMIT_PERIOD_S", bad)
        with pytest.raises(ValidationError, match="llm_limit_period_s"):
            Settings()


def test_behind_a_gateway_the_tighter_of_its_budget_and_the_providers_forwarded_one_binds() -> None:
    # Given a response through LiteLLM's proxy: the proxy's own key budget (x-ratelimit-*) and
    # the provider's, forwarded under `llm_provider-`
    headers = {
        "x-ratelimit-limit-requests": "1000",
        "x-ratelimit-remaining-requests": "990",
        "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "900000",
        "llm_provider-x-ratelimit-limit-requests": "500",
        "llm_provider-x-ratelimit-remaining-requests": "495",
        "llm_provider-x-ratelimit-limit-tokens": "30000",
        "llm_provider-x-ratelimit-remaining-tokens": "1200",
        "llm_provider-x-ratelimit-reset-tokens": "57.6s",
    }
    # When they are parsed / Then each value is the tighter of the two budgets
    assert parse_rate_limit_headers(headers) == RateLimitHeaders(
        limit_requests=500, limit_tokens=30_000, remaining_requests=495,
        remaining_tokens=1_200, reset_requests_s=None, reset_tokens_s=57.6)
    # and the provider's budget alone is read when the gateway sends none of its own
    forwarded = {k: v for k, v in headers.items() if k.startswith("llm_provider-")}
    assert parse_rate_limit_headers(forwarded).limit_tokens == 30_000


def test_a_429_through_a_gateway_carries_the_providers_forwarded_budget() -> None:
    # Given a 429 from the provider, relayed by a gateway with the budget under its prefix
    headers = {"llm_provider-x-ratelimit-limit-tokens": "30000",
               "llm_provider-x-ratelimit-remaining-tokens": "0", "retry-after": "2",
               "set-cookie": "session=secret"}
    # When it is classified / Then the error carries that budget, and nothing else
    error = classify_status(429, {"error": {"message": "slow down"}}, headers, "429", None)
    assert isinstance(error, RateLimitedError)
    assert error.rate_headers == {"llm_provider-x-ratelimit-limit-tokens": "30000",
                                  "llm_provider-x-ratelimit-remaining-tokens": "0"}
