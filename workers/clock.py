"""Time: every time docqueue stores or compares is UTC, and this is where that is made true.

SQLite hands back naive datetimes (PostgreSQL's timestamptz comes back aware); `as_utc` makes
both the same aware UTC value.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import overload


@overload
def as_utc(t: datetime) -> datetime: ...
@overload
def as_utc(t: None) -> None: ...
def as_utc(t: datetime | None) -> datetime | None:
    """`t` as an aware UTC datetime; a naive `t` is taken to be UTC already."""
    if t is None:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def monotonic_s() -> float:
    """Seconds on the monotonic clock: for deadlines and durations, never for a stored time."""
    return time.monotonic()
