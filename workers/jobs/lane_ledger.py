"""The batch lane's ledger, read: a job's view, the context of one `advance`, and the queries.

Everything here only reads the store (or writes one ledger row as it is told); the rules of
what to send and what to record are in `lane_sending.py` and `lane_recording.py`. A chunk's
prompt, max_tokens and response-cache key are made exactly as the online lane makes them, so a
chunk answered in either lane is the same cache entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import (
    FINAL_RESULT_STATES,
    Chunk,
    Job,
    Lane,
    LedgerState,
    ProviderBatch,
    ProviderBatchChunk,
    Result,
)
from docqueue.workers.batch import cache
from docqueue.workers.pipelines import Pipeline, Prompt
from docqueue.workers.provider.batch_api import BatchApi, RequestBodies
from docqueue.workers.settings import Settings

READ_CHUNKS = 2_000  # chunks per query when building files


@dataclass(frozen=True)
class JobView:
    id: int
    status: str
    pipeline: str
    version: str
    options: dict[str, Any]
    cache_policy: str
    budget_tokens: int | None
    budget_cost: float | None
    fallback_below: int | None


@dataclass
class Advance:
    """What one `advance` did, for logs and `docq resume`."""

    job_id: int
    sent: int = 0  # provider batches created
    polled: int = 0
    closed: int = 0
    recorded: int = 0  # result rows written from provider files
    cached: int = 0
    ready: bool = False  # every chunk final and nothing live: merge the job
    online: bool = False  # the job moved to the online lane: publish its batches

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class LaneRequest:
    """One chunk as a line of a Batch API input file."""

    chunk_id: int
    document_id: int
    attempts: int
    key: str
    line: bytes
    tokens: int  # prompt tokens: what the provider's enqueued-token limit counts
    max_tokens: int


@dataclass
class LaneContext:
    sessions: sessionmaker[Session]
    settings: Settings
    api: BatchApi
    bodies: RequestBodies
    endpoint: str
    job: JobView
    pipeline: Pipeline
    done: Advance = field(init=False)

    def __post_init__(self) -> None:
        self.done = Advance(self.job.id)


def job_view(session: Session, job_id: int) -> JobView | None:
    job = session.get(Job, job_id)
    if job is None or job.lane != Lane.BATCH:
        return None
    return JobView(job.id, job.status, job.pipeline, job.pipeline_version, dict(job.options),
                   job.cache_policy, job.budget_tokens, job.budget_cost, job.fallback_below)


def rows_in(ctx: LaneContext, states: Sequence[str]) -> list[ProviderBatch]:
    with ctx.sessions.begin() as session:
        rows = list(session.scalars(
            select(ProviderBatch)
            .where(ProviderBatch.job_id == ctx.job.id, ProviderBatch.state.in_(list(states)))
            .order_by(ProviderBatch.id)
        ))
        session.expunge_all()
    return rows


def update_row(ctx: LaneContext, row_id: int, **values: Any) -> None:
    with ctx.sessions.begin() as session:
        session.execute(update(ProviderBatch).where(ProviderBatch.id == row_id).values(**values))


def prompt_of(ctx: LaneContext, text: str) -> tuple[Prompt, int, str]:
    """A chunk's prompt, max_tokens and response-cache key, as the online lane makes them."""
    cfg = ctx.settings
    prompt = ctx.pipeline.render(text, cfg.mode)
    max_tokens = min(prompt.max_tokens or cfg.llm_max_tokens, cfg.llm_max_tokens)
    key = cache.cache_key(ctx.endpoint, cfg.model_name, ctx.job.version, prompt, max_tokens,
                          cfg.llm_temperature)
    return prompt, max_tokens, key


def result_of(version: str) -> Any:
    return and_(Result.chunk_id == Chunk.id, Result.pipeline_version == version)


def final(version: str) -> Any:
    return exists().where(result_of(version), Result.status.in_(FINAL_RESULT_STATES))


def linked_live() -> Any:
    return exists().where(ProviderBatchChunk.chunk_id == Chunk.id, ProviderBatchChunk.live)


def live_links(session: Session, job_id: int) -> int:
    return int(session.scalar(
        select(func.count()).select_from(ProviderBatch)
        .where(ProviderBatch.job_id == job_id, ProviderBatch.state != LedgerState.CLOSED)
    ) or 0)


def has_live(ctx: LaneContext) -> bool:
    with ctx.sessions.begin() as session:
        return live_links(session, ctx.job.id) > 0


def unfinished(session: Session, job: JobView) -> int:
    """The job's chunks still to be answered through the provider's batches. Reduce steps
    (level > 0) are not among them: `jobs.merge`, sent once these are done, makes them and
    sends them online (workers/jobs/merging.py), as it does for an online job."""
    return int(session.scalar(
        select(func.count()).select_from(Chunk)
        .where(Chunk.job_id == job.id, Chunk.level == 0, ~final(job.version))
    ) or 0)


def enqueued_tokens(session: Session) -> int:
    """Prompt tokens in every job's provider batches not closed: the provider's queue."""
    return int(session.scalar(
        select(func.coalesce(func.sum(ProviderBatch.tokens), 0))
        .where(ProviderBatch.state != LedgerState.CLOSED)
    ) or 0)


