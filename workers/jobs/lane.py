"""The batch lane: a job's chunks through the provider's Batch API, with a ledger in the store.

One `advance(job)` (run by beat, every DOCQ_BATCH_POLL_S, and by `docq resume`) moves a
batch-lane job on as far as it can without waiting:

1. finish what a crash left half done: a ledger row still `uploading` is uploaded (again), one
   `uploaded` is looked for at the provider by its metadata (`docq_ledger`) and created only
   if it is not there;
2. a cancelled job's live provider batches are cancelled at the provider;
3. every `created` provider batch is polled; a terminal one has its output and error files
   read and recorded as result rows, closed and its chunks unlinked in one transaction;
4. a running job's unfinished chunks that no live provider batch holds are answered from the
   response cache where possible, and the rest are cut into files within the provider's limits
   (requests, bytes, enqueued tokens) and the job's budget, and sent.

Every step that calls the provider is preceded by a commit that says what is about to be done,
so a crash anywhere is finished by the next `advance` without losing a line or sending a chunk
twice: the partial unique index on live chunk links keeps a chunk in one live provider batch.
A job whose every chunk has a final result and no live provider batch is `ready` to merge; the
caller sends the same `jobs.merge` as the online lane's chord.

Failed lines (a 5xx or 429 from the provider, or output that does not parse) get a `retry` row
and go in a later batch, up to DOCQ_MAX_ATTEMPTS; an expired or cancelled batch's lines that
never ran get no row at all, so those chunks are simply sent again (or, for a cancelled job,
recorded `cancelled`). A batch the provider fails whole (validation, its enqueued-token limit)
is an attempt for each of its chunks, so one that keeps failing ends in error rows. Cost is the
token usage at the batch price (settings.Price.rates).

The parts: `lane_ledger.py` (the job's view, the context, the queries), `lane_sending.py`
(cutting and sending files), `lane_recording.py` (polling, recording, closing).
"""

from __future__ import annotations

import logging
from typing import TypedDict

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Job, JobStatus, Lane, LedgerState, ProviderBatch
from docqueue.workers.clock import as_utc, utc_now
from docqueue.workers.jobs.lane_ledger import (
    Advance,
    LaneContext,
    job_view,
    live_links,
    rows_in,
    unfinished,
)
from docqueue.workers.jobs.lane_recording import cancel_live, finalize_cancelled, poll
from docqueue.workers.jobs.lane_sending import finish_sending, send_new
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.provider.batch_api import BatchApi, RequestBodies
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)


def lane_jobs(session: Session) -> list[int]:
    """Batch-lane jobs that may need work: running, or cancelled and not merged yet."""
    return list(session.scalars(
        select(Job.id).where(
            Job.lane == Lane.BATCH,
            (Job.status == JobStatus.RUNNING)
            | ((Job.status == JobStatus.CANCELLED) & Job.finished_at.is_(None)),
        ).order_by(Job.id)
    ))


def advance(sessions: sessionmaker[Session], settings: Settings, api: BatchApi,
            bodies: RequestBodies, endpoint: str, job_id: int) -> Advance:
    """Move one batch-lane job on as far as it goes without waiting (the module docstring)."""
    with sessions.begin() as session:
        job = job_view(session, job_id)
    if job is None:
        return Advance(job_id)
    ctx = LaneContext(sessions, settings, api, bodies, endpoint, job,
                      build_pipeline(job.pipeline, job.options))
    cancelled = job.status == JobStatus.CANCELLED
    for row in rows_in(ctx, (LedgerState.UPLOADING, LedgerState.UPLOADED)):
        finish_sending(ctx, row, cancelled=cancelled)
    if cancelled:
        cancel_live(ctx)
    for row in rows_in(ctx, (LedgerState.CREATED,)):
        poll(ctx, row)
    if not cancelled and _fall_back(ctx):
        ctx.done.online = True
        return ctx.done
    if not cancelled:
        send_new(ctx)
    with sessions.begin() as session:
        if cancelled and not live_links(session, job_id):
            finalize_cancelled(session, job)
        ctx.done.ready = not live_links(session, job_id) and unfinished(session, job) == 0
    return ctx.done


def _fall_back(ctx: LaneContext) -> bool:
    """Move the job to the online lane when what a provider batch left is few enough.

    Only with nothing live at the provider, so no chunk can be in a provider batch and an
    online delivery at once; the reconciler and the chord own the job from here.
    """
    threshold = ctx.job.fallback_below
    if threshold is None:
        return False
    with ctx.sessions.begin() as session:
        states = set(session.scalars(select(ProviderBatch.state).distinct()
                                     .where(ProviderBatch.job_id == ctx.job.id)))
        if states != {LedgerState.CLOSED}:
            return False  # nothing sent yet, or something still live
        left = unfinished(session, ctx.job)
        if not 0 < left <= threshold:
            return False
        session.execute(update(Job).where(Job.id == ctx.job.id).values(lane=Lane.ONLINE))
    logger.info("job %s: %d chunks left after its provider batches go online", ctx.job.id, left)
    return True


class ProviderBatchInfo(TypedDict):
    """One provider batch of a batch-lane job, as `docq status` shows it."""

    ledger: int  # the ledger row's id
    id: str | None  # the provider's batch id; None until it is created
    state: LedgerState  # the ledger's own step: uploading, uploaded, created, closed
    status: str | None  # the provider's status (validating, in_progress, completed, ...)
    requests: int
    completed: int
    failed: int
    age_s: float


def provider_batches(session: Session, job_id: int) -> list[ProviderBatchInfo]:
    """The job's provider batches for `docq status`: id, status, counts, age."""
    now = utc_now()
    out: list[ProviderBatchInfo] = []
    for row in session.scalars(select(ProviderBatch).where(ProviderBatch.job_id == job_id)
                               .order_by(ProviderBatch.id)):
        created = as_utc(row.created_at)
        out.append({
            "ledger": row.id, "id": row.provider_batch_id, "state": LedgerState(row.state),
            "status": row.provider_status, "requests": row.requests,
            "completed": row.completed, "failed": row.failed,
            "age_s": round((now - created).total_seconds(), 1),
        })
    return out
