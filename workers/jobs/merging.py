"""Merge a job's results per document (in chunk order) and per job, from the store alone.

The chord callback and the reconciler both call `merge_job`; it recomputes everything from the
result rows, so running it twice leaves the same state.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from models import Chunk, Document, DocumentStatus, Job, JobStatus, Result, ResultStatus
from workers.clock import as_utc
from workers.pipelines import build_pipeline

STREAM_ROWS = 5_000


@dataclass(frozen=True)
class MergeSummary:
    job_id: int
    status: str
    chunks_ok: int
    chunks_error: int
    chunks_other: int
    unfinished: int


@dataclass
class _Totals:
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float | None = 0.0

    def add(self, tin: int, tout: int, cost: float | None, cached: bool) -> None:
        self.tokens_in += tin
        self.tokens_out += tout
        if cost is None and not cached and (tin or tout):
            self.cost = None  # one call of unknown price makes the sum unknown
        elif self.cost is not None and cost is not None:
            self.cost += cost


def merge_job(session: Session, job_id: int) -> MergeSummary | None:
    """Write each document's merged output and the job's totals; None if the job is unknown."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    pipeline = build_pipeline(job.pipeline, job.options)
    rows = session.execute(
        select(
            Chunk.document_id,
            Result.status,
            Result.output,
            Result.tokens_in,
            Result.tokens_out,
            Result.cost,
            Result.latency_ms,
            Result.cached,
            Result.updated_at,
            Result.error_message,
        )
        .outerjoin(
            Result,
            and_(Result.chunk_id == Chunk.id, Result.pipeline_version == job.pipeline_version),
        )
        .where(Chunk.job_id == job_id)
        .order_by(Chunk.document_id, Chunk.seq)
        .execution_options(yield_per=STREAM_ROWS)
    )
    states: Counter[str] = Counter()
    totals = _Totals()
    latencies: list[float] = []
    last_result: datetime | None = None
    doc_updates: list[dict[str, Any]] = []
    for document_id, group in itertools.groupby(rows, key=lambda r: r.document_id):
        outputs: list[Any] = []
        doc_states: Counter[str] = Counter()
        doc_totals = _Totals()
        first_error: str | None = None
        for r in group:
            state = r.status if r.status and r.status != ResultStatus.RETRY else "unfinished"
            doc_states[state] += 1
            if r.status is None:
                continue
            doc_totals.add(r.tokens_in, r.tokens_out, r.cost, r.cached)
            if state == ResultStatus.ERROR and first_error is None:
                first_error = r.error_message
            if state == ResultStatus.OK:
                outputs.append(r.output)
                if r.latency_ms is not None and not r.cached:
                    latencies.append(r.latency_ms)
            if r.updated_at is not None:
                stamp = as_utc(r.updated_at)
                last_result = stamp if last_result is None else max(last_result, stamp)
        states.update(doc_states)
        totals.add(doc_totals.tokens_in, doc_totals.tokens_out, doc_totals.cost, cached=False)
        ok, total = doc_states[ResultStatus.OK], sum(doc_states.values())
        doc_updates.append(
            {
                "id": document_id,
                "status": _document_status(ok, total, doc_states["unfinished"]),
                "output": pipeline.merge(outputs) if outputs else None,
                "error": _document_error(doc_states, first_error) if ok < total else None,
                "tokens_in": doc_totals.tokens_in,
                "tokens_out": doc_totals.tokens_out,
                "cost": doc_totals.cost,
            }
        )
        if len(doc_updates) >= STREAM_ROWS:
            session.execute(update(Document), doc_updates)
            doc_updates = []
    if doc_updates:
        session.execute(update(Document), doc_updates)

    ok, err, unfinished = states[ResultStatus.OK], states[ResultStatus.ERROR], states["unfinished"]
    other = sum(states.values()) - ok - err - unfinished
    status, reason = _job_status(job, ok, err, other, unfinished, states)
    submitted = as_utc(job.submitted_at) if job.submitted_at else None
    elapsed = (last_result - submitted).total_seconds() if last_result and submitted else None
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status=status,
            reason=reason,
            chunks_ok=ok,
            chunks_error=err,
            chunks_other=other,
            tokens_in=totals.tokens_in,
            tokens_out=totals.tokens_out,
            cost=totals.cost,
            latency_p50_ms=_percentile(latencies, 50),
            latency_p95_ms=_percentile(latencies, 95),
            chunks_per_s=(ok + err + other) / elapsed if elapsed and elapsed > 0 else None,
            finished_at=last_result if unfinished == 0 else None,
        )
    )
    return MergeSummary(job_id, status, ok, err, other, unfinished)


def _document_status(ok: int, total: int, unfinished: int) -> str:
    if unfinished:
        return DocumentStatus.PENDING
    if ok == total:
        return DocumentStatus.OK
    return DocumentStatus.PARTIAL if ok else DocumentStatus.ERROR


_STATE_WORDS = {
    ResultStatus.ERROR: "failed",
    ResultStatus.SKIPPED_BUDGET: "skipped (budget)",
    ResultStatus.CANCELLED: "cancelled",
    "unfinished": "unfinished",
}


def _document_error(states: Counter[str], first_error: str | None) -> str:
    """E.g. "3 of 3 chunks failed; first error: HTTP 400 context_length_exceeded: ..."."""
    total = sum(states.values())
    parts = [
        f"{n} of {total} chunks {_STATE_WORDS.get(state, state)}"
        for state, n in sorted(states.items())
        if state != ResultStatus.OK
    ]
    text = ", ".join(parts)
    return text + (f"; first error: {first_error}" if first_error else "")


def _job_status(
    job: Job, ok: int, err: int, other: int, unfinished: int, states: Counter[str]
) -> tuple[str, str | None]:
    if job.status == JobStatus.CANCELLED or states[ResultStatus.CANCELLED]:
        # A cancelled job stays cancelled; its counts still say what was done.
        return JobStatus.CANCELLED, job.reason or "cancelled by the user"
    if unfinished:
        return JobStatus.RUNNING, f"{unfinished} chunks have no final result yet"
    if job.documents_total == 0:
        return JobStatus.FAILED, "the sources held no documents"
    reasons = []
    if job.documents_rejected:
        reasons.append(f"{job.documents_rejected} documents rejected")
    if err:
        reasons.append(f"{err} chunks failed")
    if states[ResultStatus.SKIPPED_BUDGET]:
        reasons.append(f"{states[ResultStatus.SKIPPED_BUDGET]} chunks skipped: budget reached")
    if not reasons:
        return JobStatus.SUCCEEDED, None
    status = JobStatus.FAILED if ok == 0 else JobStatus.PARTIAL
    return status, "; ".join(reasons)


def _percentile(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1], 2)
