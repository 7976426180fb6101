"""Merge a job's results per document and per job, from the store alone.

A document's answer is its pipeline's merge of its chunk outputs, or, for a pipeline that
reduces, the output of its last reduce step (workers/jobs/reducing.py). `after_batch` writes
the answers of the documents a finished batch completed, so they can be read while the job
runs; `merge_job`, run by the chord callback and the reconciler, recomputes every document and
the job's totals, and makes any reduce level still missing (a worker died between levels).
Running either twice leaves the same state.

A job whose producer is still recording it (`Job.ingesting`, streaming submission) stays
running whatever its chunks say: its batches are published in segments while it is read, and
only a merge after the producer's last commit may end it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from docqueue.models import (
    Batch,
    BatchStatus,
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobStatus,
    ResultStatus,
)
from docqueue.workers.clock import as_utc
from docqueue.workers.jobs.reducing import (
    DocumentPlan,
    Step,
    by_document,
    document_steps,
    level_batch_seq,
    make_level,
    plan_document,
)
from docqueue.workers.pipelines import Pipeline, build_pipeline

STREAM_ROWS = 5_000
INGESTING_REASON = "ingesting: the producer has not recorded the last documents yet"


@dataclass(frozen=True)
class MergeSummary:
    job_id: int
    status: str
    chunks_ok: int
    chunks_error: int
    chunks_other: int
    unfinished: int
    new_batches: list[int] = field(default_factory=list)  # reduce levels this merge made


def merge_job(session: Session, job_id: int) -> MergeSummary | None:
    """Write each document's answer and the job's totals; None if the job is unknown.

    A document whose current level is final but whose next reduce level is missing gets it
    made here: its batch id is in `new_batches`, for the caller to send.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    pipeline = build_pipeline(job.pipeline, job.options)
    states: Counter[str] = Counter()  # of the chunks (level 0)
    reduce_states: Counter[str] = Counter()  # of the reduce steps
    totals = _Totals()
    latencies: list[float] = []
    last_result: datetime | None = None
    new_batches: list[int] = []
    waiting = 0  # reduce steps just made, not yet run
    errors: set[str] = set()  # the failed chunks' messages, up to two: is there one reason?
    doc_updates: list[dict[str, Any]] = []
    for document_id, steps in by_document(document_steps(session, job)):
        plan = plan_document(steps, pipeline, _reduce_tokens(job))
        if plan.state == "reduce":
            made = make_level(session, job.id, document_id, plan.levels + 1, plan.groups,
                              pipeline)
            new_batches += [made] if made is not None else []
            waiting += len(plan.groups)
        for step in steps:
            (states if step.level == 0 else reduce_states)[_state(step)] += 1
            if step.level == 0 and step.status == ResultStatus.ERROR and len(errors) < 2:
                errors.add(step.error_message or "")
            if step.ok and step.latency_ms is not None and not step.cached:
                latencies.append(step.latency_ms)
            if step.updated_at is not None:
                stamp = as_utc(step.updated_at)
                last_result = stamp if last_result is None else max(last_result, stamp)
        values = document_values(pipeline, document_id, steps, plan)
        totals.add(values["tokens_in"], values["tokens_out"], values["cost"], cached=False,
                   tokens_in_cached=values["tokens_in_cached"])
        doc_updates.append(values)
        if len(doc_updates) >= STREAM_ROWS:
            _write_changed(session, doc_updates)
            doc_updates = []
    _write_changed(session, doc_updates)

    ok, err, unfinished = states[ResultStatus.OK], states[ResultStatus.ERROR], states["unfinished"]
    other = sum(states.values()) - ok - err - unfinished
    unfinished_all = unfinished + reduce_states["unfinished"] + waiting
    status, reason = _job_status(job, ok, err, other, unfinished_all, states, reduce_states,
                                 errors.pop() if len(errors) == 1 else None)
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
            tokens_in_cached=totals.tokens_in_cached,
            tokens_out=totals.tokens_out,
            cost=totals.cost,
            latency_p50_ms=_percentile(latencies, 50),
            latency_p95_ms=_percentile(latencies, 95),
            chunks_per_s=(ok + err + other) / elapsed if elapsed and elapsed > 0 else None,
            finished_at=last_result if unfinished_all == 0 and not job.ingesting else None,
        )
    )
    return MergeSummary(job_id, status, ok, err, other, unfinished_all, new_batches)


_DOCUMENT_VALUES = ("status", "output", "error", "tokens_in", "tokens_in_cached", "tokens_out",
                    "cost")


def _write_changed(session: Session, values: list[dict[str, Any]]) -> None:
    """Write the documents' rows whose stored values differ from `values` (`document_values`).

    By the job's end `after_batch` has written every finished document's answer: rewriting the
    same 3,000 rows was most of the final merge (0.56 of 1.27 s), which holds the job's end.
    Reading them to compare costs a tenth of that.
    """
    if not values:
        return
    columns = [getattr(Document, name) for name in _DOCUMENT_VALUES]
    stored = {
        row[0]: tuple(row[1:])
        for row in session.execute(
            select(Document.id, *columns).where(Document.id.in_([v["id"] for v in values]))
        )
    }
    changed = [v for v in values
               if stored.get(v["id"]) != tuple(v[name] for name in _DOCUMENT_VALUES)]
    if changed:
        session.execute(update(Document), changed)


def merge_due(session: Session, job_id: int) -> bool:
    """Whether a segment's callback should merge the job: not while its producer still records
    it, nor while one of its producer batches is open (that batch's own segment callback comes
    later, and merges). A job no longer running (cancelled, say) is merged as before.

    Every header task closes its batch before it returns, so the callback of the segment whose
    last batch ends last finds every batch closed; and the producer commits the job's end
    before it sends its last segment, so that callback also finds it ingested."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.RUNNING:
        return True
    if job.ingesting:
        return False
    return session.scalar(
        select(Batch.id).where(Batch.job_id == job_id, Batch.seq > 0,
                               Batch.status != BatchStatus.DONE).limit(1)
    ) is None


@dataclass
class Advance:
    """What one finished batch moved on: reduce levels made (their batch ids), documents
    given their answer, and (for a reduce batch) whether its job has no open batch left."""

    job_id: int
    reduce_batch: bool  # the batch held reduce steps
    new_batches: list[int] = field(default_factory=list)
    documents_done: int = 0
    job_idle: bool = False


def after_batch(session: Session, batch_id: int) -> Advance | None:
    """Move the documents of a finished batch on: make the next level of each whose current
    level is all final, and write the answer of each that is done, readable at once."""
    row = session.execute(
        select(Batch.job_id, Batch.seq).where(Batch.id == batch_id)
    ).one_or_none()
    if row is None:
        return None
    job = session.get(Job, row.job_id)
    assert job is not None  # a batch is deleted with its job
    advance = Advance(job.id, reduce_batch=row.seq < 0)
    document_ids = list(session.scalars(
        select(Chunk.document_id).distinct()
        .where(Chunk.job_id == job.id, Chunk.batch_seq == row.seq)
    ))
    pipeline = build_pipeline(job.pipeline, job.options)
    done: list[dict[str, Any]] = []
    waiting_levels: list[int] = []  # batch seqs of reduce levels made earlier, still unfinished
    for document_id, steps in by_document(document_steps(session, job, document_ids)):
        plan = plan_document(steps, pipeline, _reduce_tokens(job))
        if plan.state == "reduce":
            made = make_level(session, job.id, document_id, plan.levels + 1, plan.groups,
                              pipeline)
            advance.new_batches += [made] if made is not None else []
        elif plan.state == "done":
            done.append(document_values(pipeline, document_id, steps, plan))
        elif plan.levels > 0:
            waiting_levels.append(level_batch_seq(document_id, plan.levels))
    if done:
        session.execute(update(Document), done)
    advance.new_batches += never_started(session, job.id, waiting_levels)
    advance.documents_done = len(done)
    if advance.reduce_batch:  # only a reduce batch may be the job's last without its chord
        advance.job_idle = session.scalar(
            select(Batch.id).where(Batch.job_id == job.id, Batch.status != BatchStatus.DONE)
            .limit(1)
        ) is None
    return advance


def never_started(session: Session, job_id: int, seqs: Sequence[int]) -> list[int]:
    """Of these reduce levels' batches, those no delivery ever started: to be sent again.

    A level is made (committed) before its message is sent: a worker killed between the two
    leaves a batch that nothing would ever send. Its parent batch's message comes back (the
    visibility timeout, a rescue), finds its chunks final and its documents' next level made,
    and sends that level again from here. A copy of a message that was sent is harmless: a
    batch runs twice safely, its chunks called once."""
    if not seqs:
        return []
    return list(session.scalars(
        select(Batch.id).where(Batch.job_id == job_id, Batch.seq.in_(seqs),
                               Batch.status == BatchStatus.QUEUED, Batch.updated_at.is_(None))
        .order_by(Batch.id)
    ))


def document_values(pipeline: Pipeline, document_id: int, steps: Sequence[Step],
                    plan: DocumentPlan) -> dict[str, Any]:
    """A document's row as its steps make it: status, answer, error, tokens and cost.

    The answer says how it was made: the chunks, the reduce levels, the model calls paid
    (cached answers are not), the tokens, and the chunks that failed, if any.
    """
    chunks = [s for s in steps if s.level == 0]
    reduces = [s for s in steps if s.level > 0]
    totals = _Totals()
    for s in steps:
        if s.status is not None:
            totals.add(s.tokens_in, s.tokens_out, s.cost, s.cached, s.tokens_in_cached)
    values: dict[str, Any] = {"id": document_id, "tokens_in": totals.tokens_in,
                              "tokens_in_cached": totals.tokens_in_cached,
                              "tokens_out": totals.tokens_out, "cost": totals.cost,
                              "status": DocumentStatus.PENDING, "output": None, "error": None}
    failed = [s for s in chunks if not s.ok]
    failed_reduces = [s for s in reduces if s.final and not s.ok]
    partial = bool(failed or failed_reduces)
    if partial:
        values["error"] = _document_error(chunks, failed, failed_reduces)
    if plan.state != "done":
        return values
    if not plan.outputs or (partial and not pipeline.partial_answer):
        values["status"] = DocumentStatus.ERROR
        return values
    values["status"] = DocumentStatus.PARTIAL if partial else DocumentStatus.OK
    merged = pipeline.merge(plan.outputs)
    made = {
        "chunks": len(chunks),
        "levels": plan.levels,
        "reduce_steps": len(reduces),
        "calls": sum(1 for s in steps if s.status is not None and not s.cached
                     and (s.tokens_in or s.tokens_out)),
        "tokens_in": totals.tokens_in,
        "tokens_out": totals.tokens_out,
        **({"failed_chunks": [s.seq for s in failed]} if failed else {}),
    }
    values["output"] = {**merged, "made": made} if isinstance(merged, dict) else merged
    return values


def _reduce_tokens(job: Job) -> int | None:
    """The job's reduce group size; None (merge without a reduce) once it is cancelled."""
    return None if job.status == JobStatus.CANCELLED else job.reduce_tokens


def _state(step: Step) -> str:
    return step.status if step.status and step.status != ResultStatus.RETRY else "unfinished"


@dataclass
class _Totals:
    tokens_in: int = 0
    tokens_in_cached: int = 0
    tokens_out: int = 0
    cost: float | None = 0.0

    def add(self, tin: int, tout: int, cost: float | None, cached: bool,
            tokens_in_cached: int = 0) -> None:
        self.tokens_in += tin
        self.tokens_in_cached += tokens_in_cached
        self.tokens_out += tout
        if cost is None and not cached and (tin or tout):
            self.cost = None  # one call of unknown price makes the sum unknown
        elif self.cost is not None and cost is not None:
            self.cost += cost


_STATE_WORDS = {
    ResultStatus.ERROR: "failed",
    ResultStatus.SKIPPED_BUDGET: "skipped (budget)",
    ResultStatus.CANCELLED: "cancelled",
    "unfinished": "unfinished",
}
NAMED_CHUNKS = 20  # failed chunks named in a document's error; `made.failed_chunks` has all


def _document_error(chunks: Sequence[Step], failed: Sequence[Step],
                    failed_reduces: Sequence[Step]) -> str:
    """E.g. "1 of 3 chunks failed (chunk 2); first error: HTTP 400 context_length_exceeded"."""
    states = Counter(_state(s) for s in chunks)
    parts = [
        f"{n} of {len(chunks)} chunks {_STATE_WORDS.get(state, state)}"
        for state, n in sorted(states.items())
        if state != ResultStatus.OK
    ]
    text = ", ".join(parts)
    named = [str(s.seq) for s in failed if s.final][:NAMED_CHUNKS]
    if named:
        more = "..." if len([s for s in failed if s.final]) > NAMED_CHUNKS else ""
        text += f" (chunk{'s' if len(named) > 1 else ''} {', '.join(named)}{more})"
    if failed_reduces:
        text += (", " if text else "") + f"{len(failed_reduces)} reduce steps did not succeed"
    first = next((s.error_message for s in [*failed, *failed_reduces]
                  if s.status == ResultStatus.ERROR and s.error_message), None)
    return text + (f"; first error: {first}" if first else "")


def _job_status(
    job: Job, ok: int, err: int, other: int, unfinished: int, states: Counter[str],
    reduce_states: Counter[str], one_error: str | None = None,
) -> tuple[str, str | None]:
    """The job's state and the reason for it; `one_error`: the message every failed chunk has,
    when they all have the same (a refused API key, say), which the reason then names."""
    if (job.status == JobStatus.CANCELLED or states[ResultStatus.CANCELLED]
            or reduce_states[ResultStatus.CANCELLED]):
        # A cancelled job stays cancelled; its counts still say what was done.
        return JobStatus.CANCELLED, job.reason or "cancelled by the user"
    if job.ingesting:  # more chunks may come: the merge after the producer's last one decides
        return JobStatus.RUNNING, INGESTING_REASON
    if unfinished:
        return JobStatus.RUNNING, f"{unfinished} chunks or reduce steps have no final result yet"
    if job.documents_total == 0:
        return JobStatus.FAILED, "the sources held no documents"
    reasons = []
    if job.documents_rejected:
        reasons.append(f"{job.documents_rejected} documents rejected")
    if err:
        reasons.append(f"{err} chunks failed" + (f": {one_error}" if one_error else ""))
    if states[ResultStatus.SKIPPED_BUDGET]:
        reasons.append(f"{states[ResultStatus.SKIPPED_BUDGET]} chunks skipped: budget reached")
    if reduce_states[ResultStatus.ERROR]:
        reasons.append(f"{reduce_states[ResultStatus.ERROR]} reduce steps failed")
    if reduce_states[ResultStatus.SKIPPED_BUDGET]:
        reasons.append(f"{reduce_states[ResultStatus.SKIPPED_BUDGET]} reduce steps skipped: "
                       "budget reached")
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
