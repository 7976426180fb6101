"""Request and token budgets per period that refill continuously, as OpenAI enforces them.

Each budget is a token bucket whose capacity is the limit per period (a minute, as OpenAI
meters; `--period-s` shortens it, for tests) and which starts full. The arithmetic is exact: a
level is kept in units of 1/period_ns of a token (or request), so that one nanosecond refills
exactly `limit` units. A waiting time computed here is therefore the truth: after
`retry_after_ns` the same request is admitted, unless something else took the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

NS_PER_MINUTE = 60_000_000_000
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

LimitKind = Literal["requests", "tokens"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Bucket:
    """One budget (requests or tokens) per period, on a nanosecond clock."""

    def __init__(self, per_period: int, now_ns: int, period_ns: int = NS_PER_MINUTE) -> None:
        self.limit = per_period
        self._period_ns = period_ns
        self._full = per_period * period_ns
        self._level = self._full
        self._at_ns = now_ns

    def _refill(self, now_ns: int) -> None:
        if now_ns > self._at_ns:
            self._level = min(self._full, self._level + (now_ns - self._at_ns) * self.limit)
            self._at_ns = now_ns

    def wait_ns(self, amount: int, now_ns: int) -> int | None:
        """Nanoseconds until `amount` is available (0 if now); None if it never will be."""
        self._refill(now_ns)
        missing = amount * self._period_ns - self._level
        if missing <= 0:
            return 0
        if amount > self.limit:
            return None
        return _ceil_div(missing, self.limit)

    def take(self, amount: int) -> None:
        self._level -= amount * self._period_ns

    def remaining(self) -> int:
        return max(0, self._level // self._period_ns)

    def reset_ns(self) -> int:
        """Nanoseconds until the bucket is full again."""
        return _ceil_div(self._full - self._level, self.limit)


@dataclass(frozen=True)
class Decision:
    """The outcome of one admission check, with the headers to send back."""

    admitted: bool
    headers: dict[str, str]
    kind: LimitKind | None = None
    # None when rejected and no wait can help (the request is larger than the per-minute limit).
    retry_after_ns: int | None = None


class RateLimiter:
    """Admits a request only if both budgets can pay for it; a rejection takes nothing."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        period_ns: int = NS_PER_MINUTE,
    ) -> None:
        self._clock_ns = clock_ns
        self._period_ns = period_ns
        now = clock_ns()
        self._buckets: dict[LimitKind, Bucket] = {}
        if rpm is not None:
            self._buckets["requests"] = Bucket(rpm, now, period_ns)
        if tpm is not None:
            self._buckets["tokens"] = Bucket(tpm, now, period_ns)

    def admit(self, tokens: int) -> Decision:
        """Charge one request and `tokens` tokens, or say which budget is short and for how long."""
        now = self._clock_ns()
        cost: dict[LimitKind, int] = {"requests": 1, "tokens": tokens}
        waits = {kind: b.wait_ns(cost[kind], now) for kind, b in self._buckets.items()}
        if all(w == 0 for w in waits.values()):
            for kind, bucket in self._buckets.items():
                bucket.take(cost[kind])
            return Decision(admitted=True, headers=self.headers())
        # The binding budget is the one with the longest wait ("never" beats any number).
        kind = max(waits, key=lambda k: float("inf") if waits[k] is None else waits[k] or 0)
        longest = waits[kind]
        return Decision(admitted=False, headers=self.headers(), kind=kind, retry_after_ns=longest)

    def change(self, rpm: int | None, tpm: int | None) -> None:
        """New limits from now on, as when a provider lowers an account's tier mid-run: a
        budget keeps what it had left, up to its new capacity; a new budget starts full."""
        now = self._clock_ns()
        changes: tuple[tuple[LimitKind, int | None], ...] = (("requests", rpm), ("tokens", tpm))
        for kind, limit in changes:
            old = self._buckets.pop(kind, None)
            if limit is None:
                continue
            bucket = self._buckets[kind] = Bucket(limit, now, self._period_ns)
            if old is not None:
                old.wait_ns(0, now)
                bucket.take(max(0, limit - old.remaining()))

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-* headers; an unset limit sends none of its three headers."""
        now = self._clock_ns()
        out: dict[str, str] = {}
        for kind, bucket in self._buckets.items():
            bucket.wait_ns(0, now)  # refill to now so that the numbers are current
            out[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining())
            out[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.reset_ns())
        return out


def retry_after_headers(wait_ns: int) -> dict[str, str]:
    """`retry-after` (whole seconds, rounded up) and `retry-after-ms` (rounded up)."""
    return {
        "retry-after": str(max(1, _ceil_div(wait_ns, NS_PER_S))),
        "retry-after-ms": str(max(1, _ceil_div(wait_ns, NS_PER_MS))),
    }


def format_duration(ns: int) -> str:
    """OpenAI's reset format (Go's duration style, to the millisecond): 120ms, 1.5s, 6m0s."""
    if ns <= 0:
        return "0s"
    total_ms = _ceil_div(ns, NS_PER_MS)
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    if rest_ms % 1000 == 0:
        seconds = f"{rest_ms // 1000}s"
    else:
        seconds = f"{rest_ms / 1000:.3f}".rstrip("0") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{minutes}m{seconds}"
    return seconds
