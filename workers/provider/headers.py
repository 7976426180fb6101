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


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Pick the rate-limit values out of response headers (names in any case)."""
    lower = {str(name).lower(): str(value) for name, value in headers.items()}

    def limit(name: str) -> int | None:
        value = _number(lower.get(name, ""))
        return round(value) if value is not None and value >= 1 else None

    def remaining(name: str) -> float | None:
        value = _number(lower.get(name, ""))
        return value if value is not None and value >= 0 else None

    def reset(name: str) -> float | None:
        return parse_duration_s(lower[name]) if name in lower else None

    return RateLimitHeaders(
        limit_requests=limit("x-ratelimit-limit-requests"),
        limit_tokens=limit("x-ratelimit-limit-tokens"),
        remaining_requests=remaining("x-ratelimit-remaining-requests"),
        remaining_tokens=remaining("x-ratelimit-remaining-tokens"),
        reset_requests_s=reset("x-ratelimit-reset-requests"),
        reset_tokens_s=reset("x-ratelimit-reset-tokens"),
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
