"""A job read back from the store: its status, each document's result, each chunk's result.

The records are TypedDicts, not dataclasses. What `docq status --json` and `docq results`
print is exactly these records passed to `json.dumps` (and `csv.DictWriter`), so a TypedDict
keeps that output the same by construction, with no `to_dict()` to keep in step; and every
caller that already reads `doc["id"]` or `st["status"]` (scripts, `docq top`, the exporter,
the benchmarks) keeps working. The types still say which keys are there: every key below is
always present (`total=True`), and mypy checks each read. The states are the enums of
`docqueue.models` (`JobStatus`, `DocumentStatus`, `ResultStatus`): they are `str`s, so they
compare with and serialize as the plain strings they were.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal, TypedDict

import redis
from sqlalchemy import and_, func, select

from docqueue.models import (
    FINAL_JOB_STATES,
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobStatus,
    Lane,
    Result,
    ResultStatus,
)
from docqueue.tasks.failures import outage, service_errors
from docqueue.tasks.limits import running_redis
from docqueue.tasks.runtime import runtime
from docqueue.workers import keys
from docqueue.workers.batch import trouble
from docqueue.workers.batch.trouble import Outages, Trouble
from docqueue.workers.clock import wall_s
from docqueue.workers.errors import JobNotFoundError
from docqueue.workers.jobs.lane import ProviderBatchInfo, provider_batches
from docqueue.workers.settings import public_url

__all__ = [
    "ChunkResult",
    "DocumentResult",
    "JobInfo",
    "ProviderBatchInfo",
    "Trouble",
    "chunk_results",
    "document_results",
    "job_status",
    "job_trouble",
    "running_jobs",
    "store_outage",
]

READ_TIMEOUT_S = 2.0  # a poll that reads the trouble record waits no longer for Redis
# This process's view of the services it polls: since when each has been out of reach.
OUTAGES = Outages()


class JobInfo(TypedDict):
    """A job's status: its row in the store plus live progress counted from its result rows.

    `chunks_*` count the document chunks (level 0); `reduce_steps_done` counts the steps that
    merge a long document's answers. Tokens and cost are what every call so far used, and
    `cost` is None when a call's price is unknown. Times are ISO 8601 in UTC, None until then.
    """

    id: int
    name: str | None
    status: JobStatus
    reason: str | None  # why a job ended partial, failed or cancelled
    pipeline: str
    model: str
    endpoint: str
    documents_total: int
    documents_rejected: int
    chunks_total: int
    batches_total: int
    chunks_done: int  # chunks with a final result
    chunks_retrying: int  # chunks whose last call failed transiently and will be tried again
    chunks_by_state: dict[str, int]  # final chunks by ResultStatus value
    reduce_steps_done: int
    tokens_in: int
    tokens_in_cached: int  # of tokens_in: read from the provider's prompt cache
    tokens_out: int
    cost: float | None
    prompt_cache_share: float  # tokens_in_cached / tokens_in (0 before any prompt token)
    # What the cached tokens cost less than at the input rate (the job's lane and tier), in
    # dollars; None when the model's price is unknown.
    prompt_cache_saved: float | None
    latency_p50_ms: float | None  # set when the job is merged
    latency_p95_ms: float | None
    chunks_per_s: float | None
    created_at: str | None
    submitted_at: str | None
    finished_at: str | None  # set by the merge: a cancelled job is final once this is set
    lane: Lane
    provider_batches: list[ProviderBatchInfo]  # the batch lane's provider batches, oldest first
    # What keeps a running job's calls from succeeding just now, in one line (`message`): the
    # endpoint unreachable or refusing the key, a storm of 429s, 5xx or timeouts, or docqueue's
    # Redis out of reach of this reader. None when nothing is wrong, and for a final job.
    trouble: Trouble | None
    # Streaming submission: the producer has not recorded the job's last documents (it is still
    # reading, or it died: `docq resume JOB`); the job is not final before it has.
    ingesting: bool
    ingested_at: str | None  # when the producer recorded the last document


class DocumentResult(TypedDict):
    """One document's answer: its merged output, or the error that kept it from one."""

    id: str  # the document's own id: its path, or the id it was given
    source: str | None  # the file or archive member it was read from
    status: DocumentStatus
    output: Any  # the pipeline's answer (a JSON value), None without one
    error: str | None
    chunks: int
    tokens_in: int
    tokens_out: int
    cost: float | None
    content_hash: str | None
    metadata: dict[str, Any]


class ChunkResult(TypedDict):
    """One chunk's own answer, before any merge: `docq results --level chunk`."""

    id: str  # the document's id
    chunk: int  # the chunk's place in its document, from 0
    char_start: int
    char_end: int
    tokens: int
    status: ResultStatus | Literal["pending"]  # pending: no final result yet
    output: Any
    error: str | None
    tokens_in: int
    tokens_out: int


def job_status(job_id: int) -> JobInfo:
    """The job row plus live progress counted from the result rows.

    Raises:
        JobNotFoundError: no job has this id.
        StoreUnavailableError, StoreNotMigratedError: the results store cannot be used.
    """
    rt = runtime()
    with service_errors(rt.settings), rt.sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        counts: dict[str, int] = {}
        reduce_counts: dict[str, int] = {}
        for level, status, n in session.execute(
            select(Chunk.level, Result.status, func.count())
            .join(Chunk, Chunk.id == Result.chunk_id)
            .where(Result.job_id == job_id, Result.pipeline_version == job.pipeline_version)
            .group_by(Chunk.level, Result.status)
        ).all():
            target = reduce_counts if level > 0 else counts
            target[status] = target.get(status, 0) + n
        live = session.execute(
            select(func.coalesce(func.sum(Result.tokens_in), 0),
                   func.coalesce(func.sum(Result.tokens_out), 0), func.sum(Result.cost),
                   func.coalesce(func.sum(Result.tokens_in_cached), 0))
            .where(Result.job_id == job_id)
        ).one()
        tokens_in, cached = int(live[0]), int(live[3])
        price = rt.settings.price_for(job.model)
        retrying = counts.pop(ResultStatus.RETRY, 0)
        info: JobInfo = {
            "id": job.id, "name": job.name, "status": JobStatus(job.status), "reason": job.reason,
            "pipeline": job.pipeline, "model": job.model,
            # as it may be shown: a base URL can carry a user, a password or a key
            "endpoint": job.endpoint if job.endpoint == "local" else public_url(job.endpoint),
            "documents_total": job.documents_total,
            "documents_rejected": job.documents_rejected,
            "chunks_total": job.chunks_total, "batches_total": job.batches_total,
            "chunks_done": sum(counts.values()), "chunks_retrying": retrying,
            "chunks_by_state": counts,
            "reduce_steps_done": sum(n for k, n in reduce_counts.items()
                                     if k != ResultStatus.RETRY),
            "tokens_in": tokens_in, "tokens_in_cached": cached, "tokens_out": int(live[1]),
            "cost": float(live[2]) if live[2] is not None else None,
            "prompt_cache_share": round(cached / tokens_in, 4) if tokens_in else 0.0,
            "prompt_cache_saved": None if price is None else price.saved(
                cached, job.lane, job.service_tier),
            "latency_p50_ms": job.latency_p50_ms, "latency_p95_ms": job.latency_p95_ms,
            "chunks_per_s": job.chunks_per_s,
            "created_at": _iso(job.created_at), "submitted_at": _iso(job.submitted_at),
            "finished_at": _iso(job.finished_at),
            "lane": Lane(job.lane), "provider_batches": provider_batches(session, job_id),
            "trouble": None,
            "ingesting": bool(job.ingesting), "ingested_at": _iso(job.ingested_at),
        }
    OUTAGES.reached("store")
    if info["status"] not in FINAL_JOB_STATES:
        info["trouble"] = job_trouble(job_id)
    return info


def job_trouble(job_id: int) -> Trouble | None:
    """What keeps the job's calls from succeeding just now (workers/batch/trouble.py): the
    record its workers keep in docqueue's Redis; or, when this process cannot read that
    Redis, that it cannot (since when, across this process's polls). Never raises for Redis."""
    settings = runtime().settings
    url = running_redis(settings)
    if url is None:  # the embedded Redis is not running: no worker is writing one
        return None
    try:
        record = _trouble_reader(url, os.getpid()).get(keys.job_trouble(job_id))
    except redis.RedisError as exc:
        service, detail = outage(exc, settings) or ("docqueue's Redis", type(exc).__name__)
        return OUTAGES.failed("redis", service, detail)
    OUTAGES.reached("redis")
    return trouble.read(record, wall_s())


def store_outage(exc: BaseException) -> Trouble | None:
    """The trouble line for a poll the results store failed, when the store is out of reach
    (a view goes on polling); None for any other failure (it is raised)."""
    found = outage(exc, runtime().settings)
    if found is None or not found[0].startswith("the results store"):
        return None
    return OUTAGES.failed("store", *found)


@functools.cache
def _trouble_reader(url: str, pid: int) -> redis.Redis:
    """One client per Redis and process (`pid`: a forked child makes its own)."""
    return redis.Redis.from_url(url, socket_timeout=READ_TIMEOUT_S,
                                socket_connect_timeout=READ_TIMEOUT_S)


def running_jobs() -> list[JobInfo]:
    """The status (as `job_status` gives it) of every running job, oldest first.

    Raises:
        StoreUnavailableError, StoreNotMigratedError: the results store cannot be used.
    """
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        ids = list(session.scalars(
            select(Job.id).where(Job.status == JobStatus.RUNNING).order_by(Job.id)))
    found = []
    for job_id in ids:
        try:
            found.append(job_status(job_id))
        except JobNotFoundError:  # deleted since: it is not running any more
            continue
    return found


def document_results(job_id: int, *, finished_only: bool = False) -> Iterator[DocumentResult]:
    """One record per document, in submission order, streamed from the store.

    `finished_only`: leave out the documents still waiting for a chunk or a reduce step (a
    running job's documents get their answer one by one, as they finish).
    """
    rt = runtime()
    query = select(Document).where(Document.job_id == job_id)
    if finished_only:
        query = query.where(Document.status != DocumentStatus.PENDING)
    with service_errors(rt.settings), rt.sessions() as session:
        rows = session.scalars(
            query.order_by(Document.id).execution_options(yield_per=1000)
        )
        for d in rows:
            yield {
                "id": d.external_id, "source": d.source, "status": DocumentStatus(d.status),
                "output": d.output, "error": d.error, "chunks": d.chunk_count,
                "tokens_in": d.tokens_in, "tokens_out": d.tokens_out, "cost": d.cost,
                "content_hash": d.content_hash, "metadata": d.meta,
            }


def chunk_results(job_id: int) -> Iterator[ChunkResult]:
    """One record per chunk (level 0), in document and chunk order: what the model answered
    for each part of each document before any merge or reduce."""
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        version = session.scalar(select(Job.pipeline_version).where(Job.id == job_id))
        rows = session.execute(
            select(Document.external_id, Chunk.seq, Chunk.char_start, Chunk.char_end,
                   Chunk.token_count, Result.status, Result.output, Result.error_message,
                   Result.tokens_in, Result.tokens_out)
            .join(Document, Document.id == Chunk.document_id)
            .outerjoin(Result, and_(Result.chunk_id == Chunk.id,
                                    Result.pipeline_version == version))
            .where(Chunk.job_id == job_id, Chunk.level == 0)
            .order_by(Chunk.document_id, Chunk.seq)
            .execution_options(yield_per=1000)
        )
        for r in rows:
            yield {
                "id": r.external_id, "chunk": r.seq, "char_start": r.char_start,
                "char_end": r.char_end, "tokens": r.token_count,
                "status": _chunk_state(r.status),
                "output": r.output, "error": r.error_message,
                "tokens_in": r.tokens_in or 0, "tokens_out": r.tokens_out or 0,
            }


def _chunk_state(status: str | None) -> ResultStatus | Literal["pending"]:
    """A chunk with no result, or one waiting to be retried, is still pending."""
    if status is None or status == ResultStatus.RETRY:
        return "pending"
    return ResultStatus(status)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None
