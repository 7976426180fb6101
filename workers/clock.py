"""Time: the one place docqueue reads a clock, and where every stored time is made UTC.

Every read of the wall clock or the monotonic clock in `workers/` and `tasks/` goes through the
helpers here (tests/unit/test_architecture.py fails on any other `time.time()`,
`time.monotonic()`, `datetime.now(` or `datetime.utcnow(` there):

- `utc_now()`: an aware UTC datetime, for what is stored or compared with stored times;
- `wall_s()`: seconds since the epoch, for what another process compares (Redis values);
- `monotonic_s()`: seconds on the monotonic clock, for deadlines and durations in one process.

SQLite hands back naive datetimes (PostgreSQL's timestamptz comes back aware); `as_utc` makes
both the same aware UTC value.

Left out on purpose: the provider simulator (`workers/testing/simulator/`, a separate testing
tool that keeps its own clock) and code that measures CPU rather than time
(`time.process_time`, `time.perf_counter` in benchmarks/).
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
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def wall_s() -> float:
    """Now, in seconds since the epoch: comparable across processes and machines."""
    return time.time()


def monotonic_s() -> float:
    """Seconds on the monotonic clock: for deadlines and durations, never for a stored time."""
    return time.monotonic()
