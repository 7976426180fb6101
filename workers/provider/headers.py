"""Reading a provider's rate-limit headers: x-ratelimit-*, Retry-After and their duration formats.

Providers are not consistent, so every parser here returns None for a value it cannot read
instead of raising: a malformed header must never fail a model call that succeeded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from docqueue.workers.clock import wall_s

# Go's time.Duration spelling, which OpenAI uses: "1s", "6m0s", "120ms", "2.5s", "1h2m3s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration_s(text: str) -> float | None:
    """Seconds in a duration such as "6m0s", "120ms" or a bare "2.5"; None if unreadable."""
    text = text.strip().lower()
    if not text:
        return None
    bare = _number(text)
    if bare is not None:
        return bare if bare >= 0 else None
    total, end = 0.0, 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != end:
            return None
        total += float(part.group(1)) * _UNIT_S[part.group(2)]
        end = part.end()
    return total if end == len(text) else None


@dataclass(frozen=True)
class RateLimitHeaders:
    """The x-ratelimit-{limit,remaining,reset}-{requests,tokens} values of one response."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None

    @property
    def empty(self) -> bool:
        return all(value is None for value in self.__dict__.values())


# A gateway forwards the provider's own budget under a prefix, beside the x-ratelimit-* of its
# own key (LiteLLM's proxy: `llm_provider-x-ratelimit-remaining-tokens`). Both budgets bind.
FORWARDED_PREFIXES = ("", "llm_provider-")
_FIELDS = ("limit-requests", "limit-tokens", "remaining-requests", "remaining-tokens",
           "reset-requests", "reset-tokens")


def is_rate_limit_header(name: str) -> bool:
    """Whether a response header carries a budget: x-ratelimit-*, or a gateway's forward of it."""
    lower = str(name).lower()
    return any(lower.startswith(prefix + "x-ratelimit-") for prefix in FORWARDED_PREFIXES)


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Pick the rate-limit values out of response headers (names in any case).

    Behind a gateway both the gateway's budget and the provider's (forwarded under a prefix)
    may be there: each value is the tighter of the two, a limit or remaining the smaller, a
    reset the later.
    """
    lower = {str(name).lower(): str(value) for name, value in headers.items()}
    found: dict[str, list[float]] = {}
    for field in _FIELDS:
        for prefix in FORWARDED_PREFIXES:
            text = lower.get(f"{prefix}x-ratelimit-{field}")
            if text is None:
                continue
            value = parse_duration_s(text) if field.startswith("reset") else _number(text)
            if value is None or value < (1 if field.startswith("limit") else 0):
                continue
            found.setdefault(field, []).append(value)

    def tightest(field: str) -> float | None:
        values = found.get(field)
        if not values:
            return None
        return max(values) if field.startswith("reset") else min(values)

    def limit(field: str) -> int | None:
        value = tightest(field)
        return None if value is None else round(value)

    return RateLimitHeaders(
        limit_requests=limit("limit-requests"),
        limit_tokens=limit("limit-tokens"),
        remaining_requests=tightest("remaining-requests"),
        remaining_tokens=tightest("remaining-tokens"),
        reset_requests_s=tightest("reset-requests"),
        reset_tokens_s=tightest("reset-tokens"),
    )


def retry_after_s(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """The wait a response asks for: retry-after-ms, else Retry-After (seconds or an HTTP date)."""
    lower = {str(name).lower(): str(value) for name, value in headers.items()}
    milliseconds = _number(lower.get("retry-after-ms", ""))
    if milliseconds is not None and milliseconds >= 0:
        return milliseconds / 1000.0
    text = lower.get("retry-after", "").strip()
    if not text:
        return None
    seconds = _number(text)
    if seconds is not None:
        return seconds if seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    current = wall_s() if now_s is None else now_s
    return max(0.0, when.timestamp() - current)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
