"""Cron windows: a five-field cron expression in a time zone, and the fire times it names.

Guarantees: times in and out are aware, out in UTC. Semantics are cron's (croniter):
day-of-month and day-of-week restricted together mean either; in the zone's autumn repeated hour
a fixed-time schedule (minute and hour without `*`) fires once, a wildcard one at each
occurrence; a time skipped in spring fires at the jump. An expression that cannot fire, or a
zone that does not exist, is refused by `Cron.parse` with one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from docqueue.workers.clock import utc_now


@dataclass(frozen=True)
class Cron:
    """A five-field cron expression in a time zone. Times in and out are aware; out in UTC."""

    expr: str
    timezone: str = "UTC"

    @classmethod
    def parse(cls, expr: str, timezone: str = "UTC") -> Cron:
        """Check the expression and the zone.

        Raises:
            ValueError: not five fields, a field out of range, a zone that does not exist, or
                an expression that never fires; the message says which.
        """
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(
                f"cron {expr!r} has {len(fields)} fields; it needs five: "
                "minute hour day-of-month month day-of-week"
            )
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {timezone!r} is not a known IANA zone name") from None
        cron = cls(" ".join(fields), timezone)
        try:
            cron.next_after(utc_now())
        except CroniterBadCronError as exc:
            raise ValueError(f"cron {expr!r} is not valid: {exc}") from None
        except CroniterBadDateError:
            raise ValueError(f"cron {expr!r} never fires") from None
        return cron

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def window_at(self, t: datetime) -> datetime:
        """The start of the window holding `t`: the latest fire time at or before `t`."""
        # croniter's get_prev is strict, so start just after t's minute (fires are on minutes).
        start = t.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        it = croniter(self.expr, start.astimezone(self.zone))
        while True:
            fire: datetime = it.get_prev(datetime)
            if not self._skipped(fire):
                return fire.astimezone(UTC)

    def next_after(self, t: datetime) -> datetime:
        """The first fire time strictly after `t`."""
        it = croniter(self.expr, t.astimezone(self.zone))
        while True:
            fire: datetime = it.get_next(datetime)
            if not self._skipped(fire):
                return fire.astimezone(UTC)

    def _skipped(self, fire: datetime) -> bool:
        """The second occurrence of a repeated wall-clock time, for a fixed-time schedule."""
        minute, hour = self.expr.split()[:2]
        if minute.startswith("*") or hour.startswith("*") or not fire.fold:
            return False
        return fire.replace(fold=0).utcoffset() != fire.utcoffset()
