"""The simulator's per-minute budgets: exact refill, truthful waits, nothing taken on rejection."""

from __future__ import annotations

import random

import pytest

from docqueue.workers.testing.simulator.limits import (
    NS_PER_S,
    Bucket,
    RateLimiter,
    format_duration,
    retry_after_headers,
)


class FakeClock:
    def __init__(self) -> None:
        self.ns = 10 * NS_PER_S

    def __call__(self) -> int:
        return self.ns

    def advance_s(self, seconds: float) -> None:
        self.ns += int(seconds * NS_PER_S)


def test_a_shorter_period_refills_the_whole_limit_in_that_period() -> None:
    # Given 60 requests per 6 s (--period-s 6), all spent at once
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=None, clock_ns=clock, period_ns=6 * NS_PER_S)
    assert [limiter.admit(0).admitted for _ in range(61)] == [True] * 60 + [False]
    # When the 61st asks: it is told a tenth of a second, the refill of one request
    assert limiter.admit(0).retry_after_ns == NS_PER_S // 10
    # Then after 6 s exactly the whole limit is back, and not one more
    clock.advance_s(6)
    assert [limiter.admit(0).admitted for _ in range(61)] == [True] * 60 + [False]
    assert limiter.headers()["x-ratelimit-limit-requests"] == "60"


def test_budget_starts_full_and_refills_at_limit_per_minute() -> None:
    # Given 60 requests per minute, all spent at once
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=None, clock_ns=clock)
    assert [limiter.admit(0).admitted for _ in range(61)] == [True] * 60 + [False]
    # When half a second passes, then a whole second
    clock.advance_s(0.5)
    half = limiter.admit(0).admitted
    clock.advance_s(0.5)
    whole = limiter.admit(0).admitted
    # Then only the full second has refilled one request
    assert (half, whole) == (False, True)


def test_rejected_request_takes_nothing_from_either_budget() -> None:
    # Given plenty of requests but a token budget that a big request overdraws
    clock = FakeClock()
    limiter = RateLimiter(rpm=100, tpm=1000, clock_ns=clock)
    assert limiter.admit(900).admitted
    # When a 200-token request is refused
    refused = limiter.admit(200)
    # Then it is refused on tokens and the requests budget did not pay for it
    assert not refused.admitted and refused.kind == "tokens"
    assert refused.headers["x-ratelimit-remaining-requests"] == "99"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "100"
    assert limiter.admit(100).admitted


def test_retry_after_is_the_truth_for_random_loads() -> None:
    # Given random request sizes against both budgets
    rng = random.Random(3)
    for _ in range(200):
        clock = FakeClock()
        limiter = RateLimiter(rpm=rng.randint(1, 500), tpm=rng.randint(100, 50_000), clock_ns=clock)
        while True:
            cost = rng.randint(1, 100)
            decision = limiter.admit(cost)
            if not decision.admitted:
                break
        assert decision.retry_after_ns is not None
        # When the client waits exactly the advertised milliseconds (what the SDK sleeps)
        wait_ms = int(retry_after_headers(decision.retry_after_ns)["retry-after-ms"])
        clock.ns += wait_ms * 1_000_000 - 1_000_000
        early = limiter.admit(cost).admitted
        clock.ns += 1_000_000
        # Then a millisecond earlier would have been refused, and on time it is admitted
        assert early is False or wait_ms == 1
        assert limiter.admit(cost).admitted


def test_longest_wait_names_the_binding_budget() -> None:
    # Given both budgets empty, tokens far more so
    clock = FakeClock()
    limiter = RateLimiter(rpm=60, tpm=600, clock_ns=clock)
    assert limiter.admit(600).admitted
    # When the next request asks for 300 tokens (30 s to refill) but 1 request (1 s)
    decision = limiter.admit(300)
    # Then the answer is "tokens" and the wait is the token wait
    assert decision.kind == "tokens"
    assert decision.retry_after_ns == 30 * NS_PER_S


def test_request_larger_than_the_limit_can_never_be_admitted() -> None:
    # Given a 1,000 tokens-per-minute budget
    limiter = RateLimiter(rpm=None, tpm=1000, clock_ns=FakeClock())
    # When a request needs 1,001 tokens
    decision = limiter.admit(1001)
    # Then it is refused on tokens with no wait that could help
    assert (decision.admitted, decision.kind, decision.retry_after_ns) == (False, "tokens", None)


def test_unset_limit_sends_none_of_its_headers() -> None:
    # Given only a requests limit
    limiter = RateLimiter(rpm=10, tpm=None, clock_ns=FakeClock())
    # When a request is admitted
    headers = limiter.admit(5).headers
    # Then the token headers are absent and the request headers count down
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
    }


def test_bucket_never_overfills() -> None:
    # Given a bucket left alone for an hour
    clock = FakeClock()
    bucket = Bucket(5, clock())
    clock.advance_s(3600)
    # Then it holds its capacity and no more
    assert bucket.wait_ns(5, clock()) == 0
    assert bucket.wait_ns(6, clock()) is None
    assert bucket.remaining() == 5 and bucket.reset_ns() == 0


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (120 * 1_000_000, "120ms"),
        (NS_PER_S, "1s"),
        (1_500_000_000, "1.5s"),
        (360 * NS_PER_S, "6m0s"),
        (61_250_000_000, "1m1.25s"),
        (3600 * NS_PER_S + 2 * NS_PER_S, "1h0m2s"),
    ],
)
def test_durations_use_openai_reset_format(ns: int, text: str) -> None:
    assert format_duration(ns) == text


def test_retry_after_rounds_up_in_both_units() -> None:
    # Given a wait of 1.2345 s
    headers = retry_after_headers(1_234_500_000)
    # Then seconds and milliseconds both round up, never down
    assert headers == {"retry-after": "2", "retry-after-ms": "1235"}
