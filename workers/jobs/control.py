"""What users do to a job after submitting it: cancel it, retry what failed, estimate it first."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.orm import Session

from docqueue.models import (
    FINAL_JOB_STATES,
    Batch,
    BatchStatus,
    Chunk,
    Job,
    JobStatus,
    Result,
    ResultStatus,
)
from docqueue.workers.batch.calls import prompt_tokens
from docqueue.workers.clock import utc_now
from docqueue.workers.errors import JobNotFoundError
from docqueue.workers.ingest.chunking import Chunker
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.jobs import sizing
from docqueue.workers.pipelines import Pipeline
from docqueue.workers.provider import prompt_cache
from docqueue.workers.settings import Settings


def cancel_job(session: Session, job_id: int) -> bool:
    """Mark the job cancelled; False if it had already ended.

    Batches stop before their next call.
    """
    done = _rowcount(session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(FINAL_JOB_STATES))
        .values(status=JobStatus.CANCELLED, reason=f"cancelled by the user at "
                f"{utc_now():%Y-%m-%d %H:%M:%S} UTC")
    ))
    if not done and session.get(Job, job_id) is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    return bool(done)


def reopen_failed(
    session: Session, job_id: int, *, include_skipped: bool,
    budget_tokens: int | None = None, budget_cost: float | None = None,
) -> int:
    """Forget the job's failed (and budget-skipped) results so their chunks run again.

    Returns how many failed chunks and reduce steps will run again; their batches are queued
    again and the job is running until the merge. The reduce levels of their documents are
    dropped, to be made again from the chunks' new outputs (the merge makes them).
    """
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    states = [ResultStatus.ERROR] + ([ResultStatus.SKIPPED_BUDGET] if include_skipped else [])
    failed = select(Result.chunk_id).where(Result.job_id == job_id, Result.status.in_(states))
    seqs = set(session.scalars(select(Chunk.batch_seq).where(Chunk.id.in_(failed))))
    documents = set(session.scalars(select(Result.document_id).distinct().where(
        Result.job_id == job_id, Result.status.in_(states))))
    removed = _rowcount(session.execute(
        delete(Result).where(Result.job_id == job_id, Result.status.in_(states))
    ))
    if not removed:
        return 0
    _drop_reduce_levels(session, job_id, documents)
    session.execute(
        update(Batch).where(Batch.job_id == job_id, Batch.seq.in_(seqs))
        .values(status=BatchStatus.QUEUED)
    )
    session.execute(
        update(Chunk).where(Chunk.job_id == job_id, Chunk.batch_seq.in_(seqs))
        # A retried chunk starts with a clean record: the poison guard counts anew.
        .values(lease_owner=None, lease_expires_at=None, deaths=0, deaths_alone=0)
    )
    values: dict[str, Any] = {"status": JobStatus.RUNNING, "reason": None, "finished_at": None}
    if budget_tokens is not None:
        values["budget_tokens"] = budget_tokens
    if budget_cost is not None:
        values["budget_cost"] = budget_cost
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    return int(removed)


def _drop_reduce_levels(session: Session, job_id: int, document_ids: set[int]) -> None:
    """Delete the reduce steps of these documents, their results and their batches."""
    if not document_ids:
        return
    steps = and_(Chunk.job_id == job_id, Chunk.document_id.in_(document_ids), Chunk.level > 0)
    session.execute(delete(Result).where(Result.chunk_id.in_(select(Chunk.id).where(steps))))
    seqs = set(session.scalars(select(Chunk.batch_seq).where(steps).distinct()))
    session.execute(delete(Chunk).where(steps))
    if seqs:
        session.execute(delete(Batch).where(Batch.job_id == job_id, Batch.seq.in_(seqs)))


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


@dataclass
class Estimate:
    """What a job would cost, without recording or calling anything.

    `tokens_in_cached` is what the provider's prompt cache should serve of `tokens_in`: the
    prefix every chunk's prompt shares (the pipeline's instructions, schema or labels), in the
    provider's steps, for every chunk but the job's first (`predicted_cached`). `cost_min`
    prices the prompts so and no output; `cost_max` every prompt token at the full input rate
    and every output at max_tokens, a bound whatever the provider's cache does.
    """

    documents: int = 0
    rejected: int = 0
    chunks: int = 0
    tokens_in: int = 0
    tokens_in_cached: int = 0
    tokens_out_max: int = 0
    cost_min: float | None = 0.0
    cost_max: float | None = 0.0
    rejections: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "rejections"} | {
            "rejected_documents": [{"id": i, "error": e} for i, e in self.rejections[:100]]}


def estimate(
    settings: Settings, pipeline: Pipeline, documents: Iterable[SourceDocument]
) -> Estimate:
    """Prompt tokens exactly (offline tokenizer); output tokens at most max_tokens per chunk."""
    est = Estimate()
    chunker = Chunker(sizing.chunk_tokens(settings, pipeline), settings.chunk_overlap_tokens)
    for doc in documents:
        if doc.error is not None:
            est.rejected += 1
            est.rejections.append((doc.external_id, doc.error))
            continue
        assert doc.text is not None
        est.documents += 1
        for span in chunker.split(doc.text):
            prompt = pipeline.render(span.text, settings.mode)
            est.chunks += 1
            est.tokens_in += prompt_tokens(prompt)
            est.tokens_out_max += min(prompt.max_tokens or settings.llm_max_tokens,
                                      settings.llm_max_tokens)
    est.tokens_in_cached = predicted_cached(settings, pipeline, est.chunks)
    price = settings.price_for(settings.model_name)
    if price is None:
        est.cost_min = est.cost_max = None
    else:
        est.cost_min = price.cost(est.tokens_in, 0, cached=est.tokens_in_cached)
        est.cost_max = price.cost(est.tokens_in, est.tokens_out_max)
    return est


def predicted_cached(settings: Settings, pipeline: Pipeline, calls: int) -> int:
    """The prompt tokens the provider's cache should serve over `calls` chunk calls.

    Assumed: the first call of a job writes the shared prefix and every later one reads it
    (the simulator's cache does exactly that). A real provider may also miss on the calls sent
    together with the first, before its prefix is written, and on calls routed to a machine
    that has not seen it yet: then it bills more, up to `cost_max`. Only chat calls are
    counted: the ledger reads cached tokens from chat answers only (client.py).
    """
    if settings.mode != "chat" or calls < 2:
        return 0
    shared = prompt_cache.cacheable(prompt_cache.shared_prefix_tokens(pipeline, settings.mode))
    return shared * (calls - 1)
