"""Backoff before retrying a model call: exponential, full jitter, Retry-After as a floor."""

from __future__ import annotations

import random

import pytest

from docqueue.workers.provider.retry import FLOOR_SPREAD, backoff_s


def test_the_draw_spans_zero_to_the_exponential_ceiling() -> None:
    # Given attempts 0..4 with base 0.5 s and a cap of 60 s.
    rng = random.Random(7)
    for attempt in range(5):
        ceiling = 0.5 * 2**attempt
        # When many delays are drawn.
        delays = [backoff_s(attempt, base_s=0.5, cap_s=60, rand=rng.random) for _ in range(2000)]
        # Then all lie in [0, base * 2**attempt] and they cover the range (full jitter).
        assert all(0 <= d <= ceiling for d in delays)
        assert min(delays) < 0.05 * ceiling
        assert max(delays) > 0.95 * ceiling
        assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_the_cap_bounds_late_attempts_without_overflow() -> None:
    # Given an attempt far beyond where 2**attempt overflows a float.
    # When the largest possible draw is taken / Then it is the cap.
    assert backoff_s(5000, base_s=1, cap_s=30, rand=lambda: 1.0) == 30
    assert backoff_s(10, base_s=1, cap_s=30, rand=lambda: 0.5) == 15


def test_retry_after_is_a_floor_spread_a_little_above() -> None:
    # Given a provider asking for 20 s while the backoff ceiling is 4 s.
    rng = random.Random(3)
    delays = [backoff_s(3, base_s=0.5, cap_s=60, floor_s=20, rand=rng.random) for _ in range(500)]
    # Then every delay honours the 20 s, and they are spread over the next tenth of it.
    assert all(20 <= d <= 20 * (1 + FLOOR_SPREAD) for d in delays)
    assert max(delays) - min(delays) > 0.5 * 20 * FLOOR_SPREAD
    # When the floor is below the drawn delay / Then the draw stands.
    assert backoff_s(3, base_s=0.5, cap_s=60, floor_s=1, rand=lambda: 0.5) == 2.0
    # When the floor is beyond the cap / Then the provider's wait still wins.
    assert backoff_s(0, base_s=1, cap_s=5, floor_s=30, rand=lambda: 0.0) == 30


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"attempt": -1, "base_s": 1, "cap_s": 2}, "attempt"),
        ({"attempt": 1.5, "base_s": 1, "cap_s": 2}, "attempt"),
        ({"attempt": 0, "base_s": 0, "cap_s": 2}, "base_s"),
        ({"attempt": 0, "base_s": 1, "cap_s": float("inf")}, "cap_s"),
        ({"attempt": 0, "base_s": 1, "cap_s": 2, "floor_s": -1}, "floor_s"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, float], named: str) -> None:
    # When backoff_s gets an unusable argument / Then the error names it.
    attempt = kwargs.pop("attempt")
    with pytest.raises(ValueError, match=named):
        backoff_s(attempt, **kwargs)  # type: ignore[arg-type]
