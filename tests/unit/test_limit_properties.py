"""Property tests of the rate-limit arithmetic that runs in Python (no server): the simulator's
buckets against a reference model in exact fractions, and the headers the simulator writes as
the limiter reads them back. (The limiter's own buckets are Lua in Redis: the integration tier
checks them against the same kind of model, tests/integration/test_limiter_model.py.)
"""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from docqueue.workers.provider.headers import parse_duration_s, parse_rate_limit_headers
from docqueue.workers.testing.simulator.limits import NS_PER_S, RateLimiter, format_duration


class ReferenceBucket:
    """The documented contract, in exact arithmetic: capacity `limit`, starting full, refilled
    continuously at `limit` per period, never above capacity; a request is admitted only when
    the whole of it is there, and a refusal takes nothing."""

    def __init__(self, limit: int, period_ns: int) -> None:
        self.limit, self.period_ns = limit, period_ns
        self.level = Fraction(limit)
        self.at_ns = 0

    def refill(self, now_ns: int) -> None:
        self.level = min(Fraction(self.limit),
                         self.level + Fraction(self.limit * (now_ns - self.at_ns), self.period_ns))
        self.at_ns = now_ns

    def wait_ns(self, amount: int, now_ns: int) -> int | None:
        self.refill(now_ns)
        if amount > self.limit:
            return None
        missing = amount - self.level
        return 0 if missing <= 0 else math.ceil(missing * self.period_ns / self.limit)


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


steps = st.lists(st.tuples(st.integers(0, 3 * NS_PER_S), st.integers(0, 120)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 100), period_s=st.sampled_from([1, 6, 60]), steps=steps)
def test_the_simulators_token_bucket_agrees_with_the_reference_model(
    limit: int, period_s: int, steps: list[tuple[int, int]]
) -> None:
    # Given the simulator's TPM budget and the model, on one clock
    clock, period_ns = Clock(), period_s * NS_PER_S
    limiter = RateLimiter(rpm=None, tpm=limit, clock_ns=clock, period_ns=period_ns)
    model = ReferenceBucket(limit, period_ns)
    admitted: list[tuple[int, int]] = []
    for pause_ns, tokens in steps:
        # When time passes and a request of `tokens` asks
        clock.ns += pause_ns
        decision = limiter.admit(tokens)
        wait = model.wait_ns(tokens, clock.ns)
        # Then both admit it, or both refuse it with the same wait (None: never)
        assert decision.admitted == (wait == 0), (decision, wait)
        if decision.admitted:
            model.level -= tokens
            admitted.append((clock.ns, tokens))
        else:
            assert decision.retry_after_ns == wait
    # and no window [a, b] admitted more than the bucket's envelope: limit + limit (b - a) / P
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, tokens in admitted[i:]:
            total += tokens
            assert total <= limit + Fraction(limit * (end - start), period_ns)


@settings(max_examples=300, deadline=None)
@given(ns=st.integers(0, 30 * 3600 * NS_PER_S))
def test_a_reset_the_simulator_writes_is_read_back_to_the_millisecond(ns: int) -> None:
    # Given a wait, in the provider's duration format ("120ms", "1.5s", "6m0s", "1h2m3.5s")
    text = format_duration(ns)
    # When the limiter reads it / Then it is the wait rounded up to the millisecond
    seconds = parse_duration_s(text)
    assert seconds is not None, text
    assert math.isclose(seconds, math.ceil(ns / 1e6) / 1e3, rel_tol=1e-12, abs_tol=1e-9), text


@settings(max_examples=200, deadline=None)
@given(rpm=st.integers(1, 10_000), tpm=st.integers(1, 10**7), period_s=st.sampled_from([6, 60]),
       spent=st.integers(0, 10**7), elapsed_ms=st.integers(0, 120_000))
def test_the_headers_the_simulator_sends_are_what_the_limiter_learns(
    rpm: int, tpm: int, period_s: int, spent: int, elapsed_ms: int
) -> None:
    # Given a simulator budget part spent, some time ago
    clock = Clock()
    limiter = RateLimiter(rpm=rpm, tpm=tpm, clock_ns=clock, period_ns=period_s * NS_PER_S)
    limiter.admit(min(spent, tpm))
    clock.ns += elapsed_ms * 1_000_000
    headers = limiter.headers()
    # When the limiter parses the x-ratelimit-* headers
    learned = parse_rate_limit_headers(headers)
    # Then it learns the limits and the remaining budget the simulator holds, and a reset
    # within one period
    assert (learned.limit_requests, learned.limit_tokens) == (rpm, tpm)
    assert learned.remaining_tokens == int(headers["x-ratelimit-remaining-tokens"])
    assert learned.reset_tokens_s is not None and 0 <= learned.reset_tokens_s <= period_s + 1e-3
