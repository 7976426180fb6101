"""Find the jobs that lost their way and say what would finish them.

The design is in docs/ARCHITECTURE.md, "Reconcile".

The store says which chunks have no final result and which deliveries hold leases; Redis holds
one marker per published job (`docq:job:{id}:published`). A missing marker means Redis lost the
job's messages (flushed, or restarted empty), so every batch nobody is working on is sent again.
With the marker present, Redis's own redelivery (the visibility timeout) is trusted, except for a
batch whose delivery died holding its leases and that nobody has picked up since, and for an
orphan: a batch with unfinished chunks while the broker's queues are empty and no worker has
received it or works on it (its message was lost: a Redis crash between two writes of its
append-only file keeps the marker and loses the message). Both are lost messages.
Sending a batch twice is safe (leases and upserts absorb it), but it costs a worker slot, so the
rules only send what no live message can be carrying.

Dead deliveries are found sooner than that, through their heartbeats (workers/batch/liveness.py):
a registered delivery whose heartbeat is gone holds a message Redis will give back only after
its visibility timeout, so its batch is sent again at once (`rescue_targets`), and the late copy
is absorbed like any duplicate.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from docqueue.models import (
    FINAL_RESULT_STATES,
    Batch,
    BatchStatus,
    Chunk,
    Job,
    JobStatus,
    Lane,
    Result,
)
from docqueue.workers import keys
from docqueue.workers.clock import as_utc, utc_now, wall_s


@dataclass(frozen=True, slots=True)
class BatchState:
    """A batch not closed yet, as the store sees it now."""

    batch_id: int
    seq: int
    unfinished: int  # chunks without a final result
    leased: int  # of those, under a live lease: a delivery is working on them
    expired: int  # of those, under a lease that ran out without being given back
    last_seen: datetime | None  # the last delivery (or re-send) of the batch


@dataclass(frozen=True, slots=True)
class JobState:
    job_id: int
    status: str
    batches: list[BatchState]  # open batches only: a closed batch is final
    last_activity: datetime | None  # the last delivery of any batch, else the submit time

    @property
    def all_final(self) -> bool:
        return all(b.unfinished == 0 for b in self.batches)


@dataclass(frozen=True, slots=True)
class Plan:
    """What would finish one job: send some batches again, or merge it."""

    job_id: int
    resend: list[int] = field(default_factory=list)
    merge: bool = False
    in_progress: int = 0  # open batches a live delivery is working on
    reason: str = ""


def open_jobs(session: Session, job_ids: Sequence[int] | None = None) -> list[JobState]:
    """Online-lane jobs that may still need work: running, or cancelled and never merged since.

    A batch-lane job is the ledger's (workers/jobs/lane.py): its chunks must not be sent online.
    """
    wanted = and_(Job.lane == Lane.ONLINE, or_(
        Job.status == JobStatus.RUNNING,
        and_(Job.status == JobStatus.CANCELLED, Job.finished_at.is_(None), Job.chunks_total > 0),
    ))
    query = select(Job.id, Job.status, Job.submitted_at).where(wanted).order_by(Job.id)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    jobs = session.execute(query).all()
    if not jobs:
        return []
    ids = [j.id for j in jobs]
    batches = _open_batches(session, ids)
    # A SQLAlchemy Result has keys(): dict() would take it for a mapping, hence the loop.
    last: dict[int, datetime | None] = {  # noqa: C416
        job_id: seen
        for job_id, seen in session.execute(
            select(Batch.job_id, func.max(Batch.updated_at))
            .where(Batch.job_id.in_(ids))
            .group_by(Batch.job_id)
        )
    }
    return [
        JobState(j.id, j.status, batches.get(j.id, []), as_utc(last.get(j.id) or j.submitted_at))
        for j in jobs
    ]


def _open_batches(session: Session, job_ids: list[int]) -> dict[int, list[BatchState]]:
    t = now()
    final = exists().where(
        Result.chunk_id == Chunk.id,
        Result.pipeline_version == Job.pipeline_version,
        Result.status.in_(FINAL_RESULT_STATES),
    )
    rows = session.execute(
        select(
            Batch.id,
            Batch.job_id,
            Batch.seq,
            Batch.updated_at,
            func.count(Chunk.id),
            func.count(Chunk.id).filter(Chunk.lease_expires_at > t),
            func.count(Chunk.id).filter(Chunk.lease_expires_at <= t),
        )
        .select_from(Batch)
        .join(Job, Job.id == Batch.job_id)
        .outerjoin(
            Chunk, and_(Chunk.job_id == Batch.job_id, Chunk.batch_seq == Batch.seq, ~final)
        )
        .where(Batch.job_id.in_(job_ids), Batch.status != BatchStatus.DONE)
        .group_by(Batch.id, Batch.job_id, Batch.seq, Batch.updated_at)
        .order_by(Batch.job_id, Batch.seq)
    ).all()
    out: dict[int, list[BatchState]] = {}
    for bid, job_id, seq, seen, unfinished, leased, expired in rows:
        out.setdefault(job_id, []).append(
            BatchState(bid, seq, unfinished, leased, expired, as_utc(seen))
        )
    return out


def plan_job(
    job: JobState,
    *,
    published: bool,
    force: bool = False,
    lost_after_s: float,
    merge_grace_s: float = 0.0,
    abandoned: Collection[int] = (),
    queues_empty: bool = False,
    held: Collection[int] | None = None,
    settle_s: float = 0.0,
    at: datetime | None = None,
) -> Plan:
    """Decide what would finish `job`; pure, so every rule has a unit test.

    `published`: the job's marker is in Redis. `force`: send every batch nobody is working on.
    `lost_after_s`: how long a delivered batch may go unseen before its message counts as lost.
    `merge_grace_s`: leave a just-finished job to its own chord callback for this long.
    `abandoned`: batches whose task gave up after repeated failures (the store down for long).
    `queues_empty`: the broker's queues held no message when asked, just after the store;
    `held`: the batches a registered delivery or reservation names (None: not known, as
    right after Redis lost its data). With both, a batch that no queue, worker or delivery
    holds and that has not been sent or delivered for `settle_s` lost its message (Redis
    crashed before it wrote it down, say): it is sent again.
    """
    t = at or now()
    in_progress = sum(1 for b in job.batches if b.unfinished and b.leased)
    if job.all_final:
        quiet = job.last_activity is None or _age_s(job.last_activity, t) >= merge_grace_s
        if force or quiet:
            return Plan(job.job_id, merge=True, reason="every chunk has a final result")
        return Plan(job.job_id, reason="just finished: its chord callback merges it")
    free = [b for b in job.batches if b.unfinished and not b.leased]
    if force or not published:
        reason = "resumed" if force else "its messages were lost with Redis (no publish marker)"
        return Plan(job.job_id, [b.batch_id for b in free], in_progress=in_progress, reason=reason)
    holders = held or ()
    orphans = queues_empty and held is not None

    def orphan(b: BatchState) -> bool:
        # A batch never sent or delivered is as old as the job's last stir: a streaming
        # producer's batch is committed a moment before its message is sent.
        seen = b.last_seen or job.last_activity
        return b.batch_id not in holders and (seen is None or _age_s(seen, t) > settle_s)

    lost = [
        b.batch_id
        for b in free
        if b.batch_id in abandoned
        or (b.expired and (b.last_seen is None or _age_s(b.last_seen, t) > lost_after_s))
        or (orphans and orphan(b))
    ]
    reason = f"{len(lost)} batches lost their delivery" if lost else "in Redis's hands"
    return Plan(job.job_id, lost, in_progress=in_progress, reason=reason)


def rescue_targets(session: Session, batch_ids: Collection[int]) -> dict[int, list[int]]:
    """Of the batches whose delivery died, those still worth sending: open, in an open job.

    Per job id, its batch ids. A batch closed since, or of a finished job, needs nothing.
    """
    if not batch_ids:
        return {}
    open_job = or_(Job.status == JobStatus.RUNNING,
                   and_(Job.status == JobStatus.CANCELLED, Job.finished_at.is_(None)))
    rows = session.execute(
        select(Batch.job_id, Batch.id)
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.id.in_(list(batch_ids)), Batch.status != BatchStatus.DONE, open_job)
        .order_by(Batch.job_id, Batch.id)
    ).all()
    out: dict[int, list[int]] = {}
    for job_id, batch_id in rows:
        out.setdefault(job_id, []).append(batch_id)
    return out


def now() -> datetime:
    return utc_now()


def _age_s(then: datetime, t: datetime) -> float:
    return (t - then).total_seconds()


# -- the publish marker ---------------------------------------------------------------------------
# `client` is a synchronous redis-py client; the callers in tasks/ own it.


def marker_key(job_id: int) -> str:
    return keys.job_published(job_id)


def mark_published(client: Any, job_id: int) -> None:
    """Record that the job's batches are in Redis; kept (no expiry) until the job is merged."""
    client.set(marker_key(job_id), repr(wall_s()))


def forget_published(client: Any, job_id: int) -> None:
    client.delete(marker_key(job_id))


def published(client: Any, job_ids: Iterable[int]) -> Mapping[int, bool]:
    """Which of the jobs have their publish marker."""
    ids = list(job_ids)
    if not ids:
        return {}
    values = client.mget([marker_key(i) for i in ids])
    return {i: v is not None for i, v in zip(ids, values, strict=True)}


def mark_abandoned(client: Any, batch_id: int) -> None:
    """Record that a batch's task gave up: no message carries it any more."""
    client.sadd(keys.ABANDONED_BATCHES, batch_id)


def abandoned_batches(client: Any) -> set[int]:
    return {int(b) for b in client.smembers(keys.ABANDONED_BATCHES)}


def forget_abandoned(client: Any, batch_ids: Iterable[int]) -> None:
    ids = list(batch_ids)
    if ids:
        client.srem(keys.ABANDONED_BATCHES, *ids)
