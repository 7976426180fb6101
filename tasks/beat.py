"""Celery beat for schedules: cron entries that enqueue `schedules.run(name, window_start)`.

Beat only enqueues (STYLE §13). The task is where a window is claimed (one row per schedule
and window: two beats started by mistake still give one run), the schedule's lock is taken
(a run overlapping another one's ingestion is skipped), and the new and changed documents are
submitted as one job. See workers/jobs/schedules.py for what a run compares and when the baseline
moves.
"""

from __future__ import annotations

import logging
from datetime import datetime
from itertools import chain
from pathlib import Path
from typing import Any

import redis
from celery.beat import BeatLazyFunc
from celery.schedules import BaseSchedule, schedstate
from redis.exceptions import LockError

from docqueue.models.tables import RunStatus
from docqueue.tasks.celery import app
from docqueue.tasks.runtime import resolve_redis, runtime
from docqueue.workers import keys
from docqueue.workers.clock import as_utc, utc_now
from docqueue.workers.errors import JobNotPublishedError
from docqueue.workers.jobs.cron import Cron
from docqueue.workers.jobs.schedule_runs import (
    RunCounts,
    as_record,
    changed_documents,
    claim_window,
    end_run,
    finish_ingest,
    settle_runs,
)
from docqueue.workers.jobs.schedules import Schedule, ScheduleError, find_schedule, load_schedules
from docqueue.workers.jobs.submission import read_sources
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

RUN_TASK = "schedules.run"
# The lock is renewed every few hundred documents, so its life only bounds how long a dead
# run blocks the next one.
LOCK_TTL_S = 300


class CronSchedule(BaseSchedule):  # type: ignore[misc]  # Celery ships no types: an Any base
    """A cron expression in its own time zone, for beat (Celery's crontab has one app-wide)."""

    def __init__(self, cron: Cron) -> None:
        super().__init__()
        self.cron = cron

    def now(self) -> datetime:
        return utc_now()

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.now()
        due = self.cron.window_at(now) > as_utc(last_run_at)
        return schedstate(due, (self.cron.next_after(now) - now).total_seconds())

    def remaining_estimate(self, last_run_at: datetime) -> Any:
        return self.cron.next_after(as_utc(last_run_at)) - self.now()

    def __reduce__(self) -> tuple[type, tuple[Cron]]:  # beat's shelve pickles its entries
        return self.__class__, (self.cron,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CronSchedule) and other.cron == self.cron

    def __hash__(self) -> int:
        return hash(self.cron)

    def __repr__(self) -> str:
        return f"<cron {self.cron.expr} {self.cron.timezone}>"


def current_window(expr: str, timezone: str) -> str:
    """Called by beat as it sends an entry: the window that is due now, as ISO 8601 UTC."""
    return Cron(expr, timezone).window_at(utc_now()).isoformat()


def beat_entries(schedules: list[Schedule]) -> dict[str, dict[str, Any]]:
    """One beat entry per schedule; the window is computed when beat sends it."""
    entries = {}
    for s in schedules:
        now = utc_now()
        first = s.cron.next_after(now)
        period_s = (s.cron.next_after(first) - first).total_seconds()
        entries[f"schedule:{s.name}"] = {
            "task": RUN_TASK,
            "schedule": CronSchedule(s.cron),
            "args": (s.name, BeatLazyFunc(current_window, s.cron.expr, s.cron.timezone)),
            # A tick that waited out a whole period is stale: the next one covers its changes.
            "options": {"expires": max(60.0, period_s)},
        }
    return entries


def config_path(settings: Settings) -> Path:
    return Path(settings.config_path)


@app.task(name=RUN_TASK)
def run_schedule(name: str, window_start: str) -> dict[str, Any]:
    """Run one window of a schedule: submit its new and changed documents as one job."""
    rt = runtime()
    window = as_utc(datetime.fromisoformat(window_start))
    with rt.sessions.begin() as session:
        run_id = claim_window(session, name, window)
    if run_id is None:
        logger.info("schedule %s window %s: already claimed, nothing to do", name, window_start)
        return {"schedule": name, "window": window_start, "status": "duplicate"}
    client = redis.Redis.from_url(resolve_redis(rt.settings), socket_timeout=10,
                                  socket_connect_timeout=5)
    lock = client.lock(keys.schedule_lock(name), timeout=LOCK_TTL_S)
    try:
        if not lock.acquire(blocking=False):
            return _end(run_id, name, window_start, RunStatus.SKIPPED,
                        "another run of this schedule was still reading its source")
        try:
            return _run_locked(rt.settings, run_id, name, window, lock.reacquire)
        finally:
            try:
                lock.release()
            except LockError:
                logger.warning("schedule %s run %s: its lock had expired", name, run_id)
    finally:
        client.close()


def _run_locked(
    settings: Settings, run_id: int, name: str, window: datetime, heartbeat: Any
) -> dict[str, Any]:
    from docqueue.tasks.api import submit

    rt = runtime()
    iso = window.isoformat()
    path = config_path(settings)
    try:
        # Other schedules' sources may live elsewhere; this one's is read (and reported) below.
        schedule = find_schedule(load_schedules(path, check_sources=False), name, path)
    except ScheduleError as exc:
        return _end(run_id, name, iso, RunStatus.FAILED, str(exc))
    with rt.sessions.begin() as session:
        busy = settle_runs(session, name, run_id)
    if busy is not None:
        return _end(run_id, name, iso, RunStatus.SKIPPED, busy)
    counts = RunCounts()
    docs = changed_documents(rt.sessions, name, read_sources([schedule.source], settings),
                             counts, heartbeat)
    first = next(docs, None)
    job_id = None
    if first is not None:
        opts = schedule.options
        try:
            job_id = submit(
                (as_record(d) for d in chain([first], docs)), schedule.pipeline,
                labels=opts.get("labels"), schema=opts.get("schema"), prompt=opts.get("prompt"),
                name=f"schedule {name[:150]} {window:%Y-%m-%d %H:%M}Z",
            ).id
        except JobNotPublishedError as exc:
            # The job is recorded and the reconciler sends it when the broker is back: the
            # run follows that job like any other.
            logger.warning("schedule %s window %s: %s", name, iso, exc)
            job_id = exc.job_id
    with rt.sessions.begin() as session:
        status = finish_ingest(session, run_id, counts, job_id)
    logger.info("schedule %s window %s: %d seen, %d new, %d changed, %d unchanged, "
                "%d unreadable; job %s", name, iso, counts.seen, counts.new, counts.changed,
                counts.unchanged, counts.rejected, job_id)
    return {"schedule": name, "window": iso, "status": str(status), "job_id": job_id}


def _end(run_id: int, name: str, window: str, status: RunStatus, reason: str
         ) -> dict[str, Any]:
    with runtime().sessions.begin() as session:
        end_run(session, run_id, status, reason)
    logger.info("schedule %s window %s: %s (%s)", name, window, status, reason)
    return {"schedule": name, "window": window, "status": status}
