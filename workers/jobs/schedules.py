"""Schedules: corpora declared in a TOML file, re-read on cron windows, ingesting only changes.

A schedule file (`DOCQ_CONFIG`, default `docq.toml`) holds `[[schedule]]` tables:

    [[schedule]]
    name = "news"                    # unique; names the runs, the lock and the baseline
    source = "corpus/news"           # a directory, a file or a glob, relative to the file
    pipeline = "classify"
    options = { labels = ["sport", "politics"] }   # labels, schema and prompt, as for submit
    cron = "30 2 * * 1-5"            # five fields: minute hour day-of-month month day-of-week
    timezone = "Europe/Berlin"       # an IANA zone; UTC when left out

Each firing is a window, named by its start (the fire time, in UTC); one row per
(schedule, window) in `schedule_runs` decides which process runs it. A run reads the source,
compares every document's content hash with the schedule's baseline (`schedule_documents`),
and submits only the new and changed documents.

The baseline moves when a run succeeds: when its job ended `succeeded` or `partial`, the
documents of that job that ended `ok` join the baseline with their hashes. Documents that
failed, and every document of a failed or cancelled job, stay out, so the next run tries them
again. A run whose job is still going makes the next windows skip, so no document is sent
twice while its first job runs.

Cron semantics are cron's (croniter): day-of-month and day-of-week restricted together mean
either; in the zone's autumn repeated hour a fixed-time schedule (minute and hour without `*`)
fires once, a wildcard one at each occurrence; a time skipped in spring fires at the jump.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter
from sqlalchemy import func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models.tables import (
    Document,
    DocumentStatus,
    Job,
    JobStatus,
    RunStatus,
    ScheduleDocument,
    ScheduleRun,
)
from docqueue.workers.clock import as_utc
from docqueue.workers.errors import InputError, PipelineError
from docqueue.workers.ingest.sources import SourceDocument
from docqueue.workers.pipelines import build_pipeline

SCHEDULE_KEYS = frozenset({"name", "source", "pipeline", "options", "cron", "timezone"})
OPTION_KEYS = frozenset({"labels", "schema", "prompt"})
LOOKUP_BATCH = 500  # documents classified per baseline query
MAX_NAME_CHARS = 200  # ScheduleRun.schedule is a String(200)
# A run claims its window a moment before it takes the schedule's lock; older unlocked claims
# are dead.
ABANDONED_AFTER_S = 60
_GLOB_MAGIC = frozenset("*?[")


class ScheduleError(InputError):
    """A schedule file or one of its schedules is unusable; the message names it."""


# -- cron windows -------------------------------------------------------------------------------


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
            cron.next_after(datetime.now(UTC))
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


# -- the schedule file -------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    name: str
    source: str  # absolute: a relative source is taken from the schedule file's directory
    pipeline: str
    cron: Cron
    options: dict[str, Any] = field(default_factory=dict)


def load_schedules(path: Path, *, check_sources: bool = True) -> list[Schedule]:
    """Read and check every schedule of the file at `path`.

    Raises:
        ScheduleError: the file cannot be read or parsed, or a schedule is unusable (bad cron
            or zone, unknown pipeline or options, a source that does not exist); the message
            names the file and the schedule.
    """
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ScheduleError(f"cannot read the schedule file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScheduleError(f"the schedule file {path} is not valid TOML: {exc}") from None
    if unknown := sorted(set(data) - {"schedule"}):
        raise ScheduleError(f"{path}: unknown key {unknown[0]!r}; schedules go in [[schedule]]")
    tables = data.get("schedule", [])
    if not isinstance(tables, list):
        raise ScheduleError(f"{path}: 'schedule' must be an array of tables ([[schedule]])")
    schedules: list[Schedule] = []
    for number, table in enumerate(tables, 1):
        schedule = _schedule(path, number, table, check_sources)
        if any(s.name == schedule.name for s in schedules):
            raise ScheduleError(f"{path}: two schedules are named {schedule.name!r}")
        schedules.append(schedule)
    return schedules


def find_schedule(schedules: Iterable[Schedule], name: str, path: Path) -> Schedule:
    """The schedule called `name`.

    Raises:
        ScheduleError: no schedule of that name in the file at `path`.
    """
    for schedule in schedules:
        if schedule.name == name:
            return schedule
    raise ScheduleError(f"{path} has no schedule named {name!r}")


def _schedule(path: Path, number: int, table: Any, check_sources: bool) -> Schedule:
    where = f"{path}: schedule #{number}"
    if not isinstance(table, dict):
        raise ScheduleError(f"{where} is not a table")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise ScheduleError(f"{where} needs a 'name': a string of 1 to {MAX_NAME_CHARS} characters")
    where = f"{path}: schedule {name!r}"
    if unknown := sorted(set(table) - SCHEDULE_KEYS):
        raise ScheduleError(f"{where}: unknown key {unknown[0]!r} "
                            f"(known: {', '.join(sorted(SCHEDULE_KEYS))})")
    text: dict[str, str] = {}
    for key in ("source", "pipeline", "cron", "timezone"):
        value = table.get(key, "UTC" if key == "timezone" else None)
        if not isinstance(value, str) or not value.strip():
            raise ScheduleError(f"{where} needs {key!r} as a non-empty string")
        text[key] = value
    try:
        cron = Cron.parse(text["cron"], text["timezone"])
    except ValueError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ScheduleError(f"{where}: 'options' must be a table")
    if unknown := sorted(set(options) - OPTION_KEYS):
        raise ScheduleError(f"{where}: unknown option {unknown[0]!r} "
                            f"(known: {', '.join(sorted(OPTION_KEYS))})")
    try:
        build_pipeline(text["pipeline"], options)
    except PipelineError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    source = os.path.abspath(path.parent / text["source"])  # an absolute one stays as it is
    if check_sources and (problem := missing_source(source)):
        raise ScheduleError(f"{where}: {problem}")
    return Schedule(name, source, text["pipeline"], cron, dict(options))


def missing_source(source: str) -> str | None:
    """Why `source` cannot be read as a file, a directory or a glob, or None if it can."""
    parts = PurePath(source).parts
    magic = [i for i, part in enumerate(parts) if _GLOB_MAGIC.intersection(part)]
    if not magic:
        return None if Path(source).exists() else f"the source {source} does not exist"
    base = Path(*parts[: magic[0]])
    if not base.is_dir():
        return f"the source {source} is a glob under {base}, which is not a directory"
    return None


# -- one run: which documents changed -----------------------------------------------------------


@dataclass
class RunCounts:
    seen: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    rejected: int = 0
    rejections: list[str] = field(default_factory=list)  # the first few reasons

    def as_columns(self) -> dict[str, int]:
        return {"documents_seen": self.seen, "documents_new": self.new,
                "documents_changed": self.changed, "documents_unchanged": self.unchanged,
                "documents_rejected": self.rejected}


def changed_documents(
    sessions: sessionmaker[Session],
    schedule: str,
    documents: Iterable[SourceDocument],
    counts: RunCounts,
    heartbeat: Callable[[], object] | None = None,
) -> Iterator[SourceDocument]:
    """The documents that are new to the schedule's baseline or whose hash changed, counted.

    Unreadable documents are counted as rejected and left out: they are not sent to a job, so
    a broken file does not start a job on every run; the first reasons are kept in `counts`.
    `heartbeat` is called once per lookup batch (to keep a lock alive).
    """
    pending: list[SourceDocument] = []
    for doc in documents:
        counts.seen += 1
        if doc.error is not None:
            counts.rejected += 1
            if len(counts.rejections) < 20:
                counts.rejections.append(doc.error)
            continue
        pending.append(doc)
        if len(pending) >= LOOKUP_BATCH:
            yield from _classify(sessions, schedule, pending, counts)
            pending = []
            if heartbeat is not None:
                heartbeat()
    yield from _classify(sessions, schedule, pending, counts)


def _classify(
    sessions: sessionmaker[Session], schedule: str, docs: Sequence[SourceDocument],
    counts: RunCounts,
) -> list[SourceDocument]:
    if not docs:
        return []
    with sessions() as session:
        known = dict(session.execute(
            select(ScheduleDocument.external_id, ScheduleDocument.content_hash).where(
                ScheduleDocument.schedule == schedule,
                ScheduleDocument.external_id.in_([d.external_id for d in docs]),
            )
        ).all())
    out = []
    for doc in docs:
        before = known.get(doc.external_id)
        if before is None:
            counts.new += 1
        elif before != doc.content_hash:
            counts.changed += 1
        else:
            counts.unchanged += 1
            continue
        out.append(doc)
    return out


def as_record(doc: SourceDocument) -> dict[str, Any]:
    """A document as a submit() record; its path moves into the metadata."""
    metadata = dict(doc.metadata)
    if doc.source is not None:
        metadata.setdefault("source", doc.source)
    return {"id": doc.external_id, "text": doc.text, "metadata": metadata}


# -- the run rows -------------------------------------------------------------------------------


def claim_window(
    session: Session, schedule: str, window_start: datetime,
    status: RunStatus = RunStatus.INGESTING, reason: str | None = None,
) -> int | None:
    """Insert the run row of this window; None when another process already has it."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(ScheduleRun)
        .values(schedule=schedule, window_start=window_start.astimezone(UTC), status=status,
                reason=reason, started_at=datetime.now(UTC))
        .on_conflict_do_nothing(index_elements=["schedule", "window_start"])
        .returning(ScheduleRun.id)
    )
    run_id: int | None = session.scalar(stmt)
    return run_id


def settle_runs(session: Session, schedule: str, current_run: int) -> str | None:
    """Close the schedule's earlier runs whose jobs ended, moving the baseline for successes.

    Call it while holding the schedule's lock: another run still `ingesting` a while after
    it started lost its process (a live one would hold the lock), and is marked failed.
    Returns why the current run must skip (an earlier run's job is still going), or None.
    """
    now = datetime.now(UTC)
    session.execute(
        update(ScheduleRun)
        .where(ScheduleRun.schedule == schedule, ScheduleRun.id != current_run,
               ScheduleRun.status == RunStatus.INGESTING,
               ScheduleRun.started_at < now - timedelta(seconds=ABANDONED_AFTER_S))
        .values(status=RunStatus.FAILED, settled_at=now,
                reason="abandoned: its process stopped before the job was submitted")
    )
    rows = session.execute(
        select(ScheduleRun, Job.status)
        .outerjoin(Job, Job.id == ScheduleRun.job_id)
        .where(ScheduleRun.schedule == schedule, ScheduleRun.status == RunStatus.RUNNING)
        .order_by(ScheduleRun.window_start)
    ).all()
    busy = None
    for run, job_status in rows:
        if job_status in (JobStatus.SUCCEEDED, JobStatus.PARTIAL):
            _promote(session, run)
            run.status, run.settled_at = RunStatus(job_status), now
        elif job_status in (JobStatus.FAILED, JobStatus.CANCELLED) or job_status is None:
            what = "was deleted" if job_status is None else f"ended {job_status}"
            run.status, run.settled_at = RunStatus.FAILED, now
            run.reason = f"job {run.job_id} {what}; its documents will be tried again"
        else:
            busy = (f"the run of {_iso(run.window_start)} is still going "
                    f"(job {run.job_id} is {job_status})")
    return busy


def _promote(session: Session, run: ScheduleRun) -> None:
    """Take the documents that ended ok in the run's job into the schedule's baseline."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    rows = select(
        literal(run.schedule, ScheduleDocument.schedule.type).label("schedule"),
        Document.external_id, Document.content_hash,
        literal(run.id, ScheduleDocument.run_id.type).label("run_id"),
    ).where(Document.job_id == run.job_id, Document.status == DocumentStatus.OK,
            Document.content_hash.is_not(None))
    stmt = insert(ScheduleDocument).from_select(
        ["schedule", "external_id", "content_hash", "run_id"], rows
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["schedule", "external_id"],
        set_={"content_hash": stmt.excluded.content_hash, "run_id": stmt.excluded.run_id},
    )
    session.execute(stmt)


def finish_ingest(
    session: Session, run_id: int, counts: RunCounts, job_id: int | None
) -> RunStatus:
    """Record what the run saw and the job it started (none: nothing was new or changed)."""
    status = RunStatus.RUNNING if job_id is not None else RunStatus.UNCHANGED
    reason = None
    if counts.rejected:
        reason = f"{counts.rejected} unreadable, first: {counts.rejections[0]}"
    now = datetime.now(UTC)
    session.execute(
        update(ScheduleRun).where(ScheduleRun.id == run_id).values(
            status=status, job_id=job_id, reason=reason, ingested_at=now,
            settled_at=None if job_id is not None else now, **counts.as_columns())
    )
    return status


def end_run(session: Session, run_id: int, status: RunStatus, reason: str) -> None:
    """Close a run that will not ingest: skipped, or failed before it could."""
    session.execute(
        update(ScheduleRun).where(ScheduleRun.id == run_id).values(
            status=status, reason=reason, settled_at=datetime.now(UTC))
    )


def last_runs(session: Session, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The latest run of each schedule, with its job's live status."""
    latest = (
        select(ScheduleRun.schedule, func.max(ScheduleRun.window_start).label("w"))
        .where(ScheduleRun.schedule.in_(names)).group_by(ScheduleRun.schedule).subquery()
    )
    rows = session.execute(
        select(ScheduleRun, Job.status)
        .join(latest, (latest.c.schedule == ScheduleRun.schedule)
              & (latest.c.w == ScheduleRun.window_start))
        .outerjoin(Job, Job.id == ScheduleRun.job_id)
    ).all()
    return {run.schedule: run_summary(run, job_status) for run, job_status in rows}


def run_state(status: str, job_status: str | None) -> str:
    """A run's state as a person should read it, consistent with its job's.

    A run stays `running` in the store until the next run of its schedule settles it (that is
    when the baseline moves), so a run whose job has ended reads as the run will be settled:
    succeeded or partial with its job, failed when its job failed, was cancelled or is gone.
    """
    if status != RunStatus.RUNNING:
        return str(status)
    if job_status in (JobStatus.SUCCEEDED, JobStatus.PARTIAL):
        return str(job_status)
    if job_status in (JobStatus.FAILED, JobStatus.CANCELLED) or job_status is None:
        return str(RunStatus.FAILED)
    return str(RunStatus.RUNNING)


def run_summary(run: ScheduleRun, job_status: str | None = None) -> dict[str, Any]:
    return {
        "window_start": _iso(run.window_start), "status": run.status, "reason": run.reason,
        "job_id": run.job_id, "job_status": job_status,
        "documents_seen": run.documents_seen, "documents_new": run.documents_new,
        "documents_changed": run.documents_changed,
        "documents_unchanged": run.documents_unchanged,
        "documents_rejected": run.documents_rejected,
    }


def _iso(t: datetime | None) -> str | None:
    return None if t is None else as_utc(t).isoformat()
