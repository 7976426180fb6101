"""The life of a job once it is recorded: listing jobs, and purging finished ones.

A purge deletes a job's results, chunks, batches, provider-batch ledger, documents and its row,
each table by an explicit statement (SQLite does not enforce the foreign keys' cascades), in
one transaction: a purge either leaves none of the job's rows or changes nothing. A job that is
not final (pending or running) is refused: its workers would write into rows being deleted.
The response cache is shared by every job and is left alone unless asked for; then the entries
the job's chunks would be answered from (their keys, made as the workers make them with the
current model settings) go too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from docqueue.models import (
    FINAL_JOB_STATES,
    Batch,
    CachedResponse,
    Chunk,
    Document,
    Job,
    ProviderBatch,
    ProviderBatchChunk,
    Result,
)
from docqueue.models.tables import ScheduleRun
from docqueue.workers.batch import cache
from docqueue.workers.clock import as_utc, utc_now
from docqueue.workers.errors import InputError, JobNotFoundError
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.settings import Settings

_KEYS_PER_DELETE = 1_000


@dataclass(frozen=True, slots=True)
class JobSummary:
    """One line of `docq jobs`."""

    id: int
    name: str | None
    status: str
    pipeline: str
    chunks_done: int
    chunks_total: int
    tokens: int
    cost: float | None
    created_at: str | None
    age_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_jobs(session: Session, *, status: str | None = None, limit: int = 20,
              now: datetime | None = None) -> list[JobSummary]:
    """The newest `limit` jobs (of `status`, if given), newest first, with live progress."""
    now = now or utc_now()
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    jobs = list(session.scalars(query))
    live = {row.job_id: row for row in session.execute(
        select(Result.job_id,
               func.count().filter(Result.status != "retry").label("done"),
               func.coalesce(func.sum(Result.tokens_in + Result.tokens_out), 0).label("tokens"),
               func.sum(Result.cost).label("cost"))
        .join(Chunk, Chunk.id == Result.chunk_id)
        .where(Result.job_id.in_([j.id for j in jobs]), Chunk.level == 0)
        .group_by(Result.job_id))} if jobs else {}
    found = []
    for job in jobs:
        row = live.get(job.id)
        created = as_utc(job.created_at) if job.created_at is not None else None
        found.append(JobSummary(
            id=job.id, name=job.name, status=job.status, pipeline=job.pipeline,
            chunks_done=int(row.done) if row else 0, chunks_total=job.chunks_total,
            tokens=int(row.tokens) if row else 0,
            cost=float(row.cost) if row is not None and row.cost is not None else job.cost,
            created_at=created.isoformat() if created else None,
            age_s=(now - created).total_seconds() if created else 0.0))
    return found


def finished_before(session: Session, days: float, now: datetime | None = None) -> list[int]:
    """Ids of the final jobs that finished (or, never run, were created) over `days` ago."""
    cutoff = (now or utc_now()) - timedelta(days=days)
    ended = func.coalesce(Job.finished_at, Job.created_at)
    return list(session.scalars(select(Job.id).where(
        Job.status.in_([str(s) for s in FINAL_JOB_STATES]), ended < cutoff).order_by(Job.id)))


@dataclass
class PurgeReport:
    jobs: int = 0
    documents: int = 0
    chunks: int = 0
    results: int = 0
    cache_entries: int = 0


def check_purgeable(session: Session, job_ids: Sequence[int]) -> None:
    """Raises:
        JobNotFoundError: a job does not exist.
        InputError: a job is still pending or running.
    """
    states = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all())
    for job_id in job_ids:
        if job_id not in states:
            raise JobNotFoundError(f"job {job_id} does not exist; nothing was purged")
        if states[job_id] not in FINAL_JOB_STATES:
            raise InputError(f"job {job_id} is still {states[job_id]}: cancel it first "
                             f"(docq cancel {job_id}); nothing was purged")


@dataclass(frozen=True, slots=True)
class CacheScope:
    """What a chunk's cache key is made of beside the job: the settings and the model's URL."""

    settings: Settings
    endpoint: str


def purge(session: Session, job_ids: Sequence[int], *,
          cache_scope: CacheScope | None = None) -> PurgeReport:
    """Delete every row of the final jobs `job_ids` in the session's transaction.

    `cache_scope`: also delete the response-cache entries of their chunks.

    Raises:
        JobNotFoundError, InputError: see `check_purgeable`; nothing is deleted.
    """
    check_purgeable(session, job_ids)
    report = PurgeReport()
    for job_id in job_ids:
        if cache_scope is not None:
            report.cache_entries += _purge_cache(session, job_id, cache_scope)
        report.results += _count(session.execute(delete(Result).where(Result.job_id == job_id)))
        ledger = select(ProviderBatch.id).where(ProviderBatch.job_id == job_id)
        session.execute(delete(ProviderBatchChunk)
                        .where(ProviderBatchChunk.provider_batch_id.in_(ledger)))
        session.execute(delete(ProviderBatch).where(ProviderBatch.job_id == job_id))
        report.chunks += _count(session.execute(delete(Chunk).where(Chunk.job_id == job_id)))
        session.execute(delete(Batch).where(Batch.job_id == job_id))
        report.documents += _count(session.execute(
            delete(Document).where(Document.job_id == job_id)))
        session.execute(update(ScheduleRun).where(ScheduleRun.job_id == job_id)
                        .values(job_id=None))
        report.jobs += _count(session.execute(delete(Job).where(Job.id == job_id)))
    return report


def _count(result: Any) -> int:
    return int(result.rowcount or 0)


def _purge_cache(session: Session, job_id: int, scope: CacheScope) -> int:
    deleted = 0
    batch: list[str] = []
    for key in _cache_keys(session, job_id, scope):
        batch.append(key)
        if len(batch) >= _KEYS_PER_DELETE:
            deleted += _count(session.execute(
                delete(CachedResponse).where(CachedResponse.key.in_(batch))))
            batch = []
    if batch:
        deleted += _count(session.execute(
            delete(CachedResponse).where(CachedResponse.key.in_(batch))))
    return deleted


def _cache_keys(session: Session, job_id: int, scope: CacheScope) -> Iterator[str]:
    """The response-cache key of each chunk of the job, as batch/processing.py makes it."""
    job = session.get(Job, job_id)
    assert job is not None  # checked by the caller
    pipeline = build_pipeline(job.pipeline, job.options)
    settings = scope.settings
    rows = session.execute(select(Chunk.text, Chunk.level).where(Chunk.job_id == job_id)
                           .execution_options(yield_per=1_000))
    for text, level in rows:
        prompt = pipeline.render(text, settings.mode, level)
        max_tokens = min(prompt.max_tokens or settings.llm_max_tokens, settings.llm_max_tokens)
        yield cache.cache_key(scope.endpoint, job.model, job.pipeline_version, prompt, max_tokens,
                              settings.llm_temperature)
