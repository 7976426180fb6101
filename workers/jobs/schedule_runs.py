"""One schedule run: which documents changed, and the run rows that decide and record it.

Guarantees: one row per (schedule, window) in `schedule_runs` decides which process runs a
window (`claim_window`); a run submits only documents new to the schedule's baseline or whose
content hash changed; the baseline moves only when a run's job ended `succeeded` or `partial`,
and then only by that job's documents that ended `ok` (`settle_runs`), so a failed document is
tried again by the next run; a run whose job is still going makes the next windows skip, so no
document is sent twice while its first job runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

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
from docqueue.workers.clock import as_utc, utc_now
from docqueue.workers.ingest.documents import SourceDocument

LOOKUP_DOCUMENTS = 500  # documents classified per baseline query
# A run claims its window a moment before it takes the schedule's lock; older unlocked claims
# are dead.
ABANDONED_AFTER_S = 60


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
        if len(pending) >= LOOKUP_DOCUMENTS:
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
                reason=reason, started_at=utc_now())
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
    now = utc_now()
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
    now = utc_now()
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
            status=status, reason=reason, settled_at=utc_now())
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
