"""What the limiter admits and refuses: a scope's limits, the ticket of an admitted call, the
two refusals, and the checks every argument of the limiter passes.

workers/provider/limiter.py holds the limiter itself (the Lua steps and the waiting); this
module is the vocabulary it shares with its callers, with no Redis in it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from docqueue.workers import keys
from docqueue.workers.errors import PermanentError, RetryableError
from docqueue.workers.provider.headers import RateLimitHeaders, parse_rate_limit_headers


@dataclass(frozen=True)
class Limits:
    """The provider's budget for one scope; None means unknown (learned from headers) or none."""

    rpm: int | None
    tpm: int | None
    max_inflight: int
    period_s: float = 60.0
    # False for a provider that charges prompt + max_tokens when it admits a call and gives
    # nothing back (OpenAI, docqueue's simulator): settle then charges overruns only.
    refund_unused_tokens: bool = True
    # Adaptive concurrency (AIMD) for endpoints that publish no limits: the calls in flight are
    # held to a window that grows while answers come back steadily and shrinks on 429s, 5xx,
    # timeouts and rising latency; at least window_floor, starting at window_start, at most
    # max_inflight. Shared by every process of the scope.
    adaptive: bool | None = False  # None: only while no rate limit is configured or learned
    window_floor: int = 2
    window_start: int = 32

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and not is_count(value, minimum=1):
                raise ValueError(f"Limits.{name} must be a whole number >= 1 or None: {value!r}")
        if not is_count(self.max_inflight, minimum=1):
            raise ValueError(
                f"Limits.max_inflight must be a whole number >= 1: {self.max_inflight!r}"
            )
        for name in ("window_floor", "window_start"):
            if not is_count(getattr(self, name), minimum=1):
                raise ValueError(f"Limits.{name} must be a whole number >= 1: "
                                 f"{getattr(self, name)!r}")
        if not is_positive(self.period_s):
            raise ValueError(f"Limits.period_s must be a finite number > 0, got {self.period_s!r}")


@dataclass(frozen=True)
class Ticket:
    """One admitted call: its in-flight slot and its reservation. Settle or release it once."""

    slot_id: str
    tokens: int
    admitted_at_us: int  # Redis clock
    # Where this call's charges sit in the shared buckets (for refunds) and how much had been
    # admitted up to and including it (for reading the provider's remaining-* headers).
    request_mark: float
    token_mark: float
    requests_admitted: float
    tokens_admitted: float

    @property
    def admitted_at_s(self) -> float:
        return self.admitted_at_us / 1e6


class LimiterBusy(RetryableError):
    """The wait for capacity is longer than the caller accepts; nothing is held.

    `wait_s` is the wait still needed (a lower bound when the in-flight cap is what is full),
    a fair countdown for retrying later; `reason` is "rate", "cool-down", "in-flight" or "queue".
    """

    def __init__(self, wait_s: float, reason: str) -> None:
        super().__init__(f"rate limiter busy ({reason}): capacity in about {wait_s:.2f}s")
        self.wait_s = wait_s
        self.reason = reason


class RequestTooLargeError(PermanentError):
    """One request needs more tokens than the whole per-period budget: it can never be sent."""

    def __init__(self, tokens: int, tpm: int) -> None:
        super().__init__(
            f"a request of {tokens} tokens exceeds the whole token budget of {tpm} per period; "
            "use smaller chunks or a lower max_tokens"
        )
        self.tokens = tokens
        self.tpm = tpm


def scope_for(endpoint: str, model: str, key_fingerprint: str) -> str:
    """The limiter scope of one provider endpoint, model and API key (given as a fingerprint)."""
    endpoint_hash = hashlib.sha256(endpoint.rstrip("/").encode()).hexdigest()[:12]
    return keys.limiter_scope(endpoint_hash, model, key_fingerprint)


def parsed_headers(headers: Mapping[str, str] | None) -> RateLimitHeaders | None:
    if headers is None:
        return None
    parsed = parse_rate_limit_headers(headers)
    return None if parsed.empty else parsed


def output_pair(key: str | None, tokens: int | None) -> tuple[str, int] | None:
    if key is None and tokens is None:
        return None
    if key is None or tokens is None:
        raise ValueError("output_key and output_tokens go together: give both or neither")
    check_key(key)
    check_count("output_tokens", tokens)
    return key, tokens


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"output key must be a non-empty string, got {key!r}")


def check_count(name: str, value: int, *, minimum: int = 0) -> None:
    if not is_count(value, minimum=minimum):
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def is_count(value: object, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def as_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def as_text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
