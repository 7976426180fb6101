"""A document's reduce stage: its chunk outputs answered again, level by level, until one is left.

Level 0 is the document's chunks. A reduce step at level L > 0 is a chunk row of its own, keyed
(document, L, group index), whose text is one group of level L-1's good outputs that fits the
model's context (`Job.reduce_tokens`, fixed at submit). The ordinary batch task processes it,
so the limiter, the response cache, the budget, retries, leases and the fence apply to it as
to any chunk, and a step with a final row is never sent again. Each level of a document is one
batch, numbered below zero (`level_batch_seq`) so it never meets the producer's batches.

A document's next level is made as soon as every row of its current level is final: by the
batch that finished the level (`merging.after_batch`, called by the task once its batch is
done), or else by the job's merge (`merging.merge_job`), which looks at every document. Both insert
with the unique keys ignoring rows that exist, so a level is made once however many look.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, select
from sqlalchemy.orm import Session

from docqueue.models import (
    FINAL_RESULT_STATES,
    Batch,
    BatchStatus,
    Chunk,
    Job,
    Result,
    ResultStatus,
    table_of,
    upsert_statement,
)
from docqueue.workers.pipelines import Pipeline
from docqueue.workers.tokens import count_tokens

LEVELS_PER_DOCUMENT = 64  # a level has at most half the steps of the one below: 2**64 chunks


@dataclass(frozen=True, slots=True)
class Step:
    """One row of a document at one level (a chunk, or a reduce step) with its result."""

    level: int
    seq: int
    char_start: int
    char_end: int
    status: str | None  # None: no result row yet
    output: Any = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float | None = None
    cached: bool = False
    latency_ms: float | None = None
    updated_at: datetime | None = None
    error_message: str | None = None
    tokens_in_cached: int = 0  # of tokens_in: read from the provider's prompt cache

    @property
    def final(self) -> bool:
        return self.status in FINAL_RESULT_STATES

    @property
    def ok(self) -> bool:
        return self.status == ResultStatus.OK


@dataclass
class DocumentPlan:
    """Where a document stands: `pending` (a level has unfinished rows), `reduce` (the next
    level, `groups`, is to be made) or `done` (`outputs` is its answer's input)."""

    state: str
    levels: int  # the highest level with rows
    outputs: list[Any] = field(default_factory=list)
    groups: list[list[Step]] = field(default_factory=list)


def plan_document(steps: Sequence[Step], pipeline: Pipeline, reduce_tokens: int | None
                  ) -> DocumentPlan:
    """What comes next for a document, from its rows at every level."""
    top = max(s.level for s in steps)
    current = [s for s in steps if s.level == top]
    if not all(s.final for s in current):
        return DocumentPlan("pending", top)
    good = [s for s in current if s.ok]
    if reduce_tokens is not None and pipeline.reduces and len(good) > 1:
        return DocumentPlan("reduce", top, groups=group_steps(good, pipeline, reduce_tokens))
    below = top
    while not good and below > 0:  # a reduce level none of whose steps succeeded (a budget
        below -= 1  # spent): the answer is the merge of the best level below it
        good = [s for s in steps if s.level == below and s.ok]
    return DocumentPlan("done", top, outputs=[s.output for s in good])


def group_steps(steps: Sequence[Step], pipeline: Pipeline, budget: int) -> list[list[Step]]:
    """Consecutive groups of outputs of at most `budget` tokens each, at least two a group
    (`sizing.reduce_group_tokens` makes room for two), so each level has fewer steps."""
    groups: list[list[Step]] = []
    group: list[Step] = []
    used = 0
    for step in steps:
        tokens = count_tokens(pipeline.reduce_text([step.output])) + 1  # and its separator
        if len(group) >= 2 and used + tokens > budget:
            groups.append(group)
            group, used = [], 0
        group.append(step)
        used += tokens
    groups.append(group)
    return groups


def level_batch_seq(document_id: int, level: int) -> int:
    """The batch number of a document's reduce level: below zero, one per (document, level)."""
    return -(document_id * LEVELS_PER_DOCUMENT + level)


def make_level(session: Session, job_id: int, document_id: int, level: int,
               groups: Sequence[Sequence[Step]], pipeline: Pipeline) -> int | None:
    """Insert a document's reduce level (its steps and their batch) unless it exists.

    Returns the new batch's id, or None when another process made the level first.
    """
    dialect = session.get_bind().dialect.name
    seq = level_batch_seq(document_id, level)
    texts = [pipeline.reduce_text([s.output for s in group]) for group in groups]
    tokens = [count_tokens(t) for t in texts]
    table = table_of(Batch)
    batch = upsert_statement(dialect, table, ("job_id", "seq")).returning(table.c.id)
    batch_id: int | None = session.execute(batch, {
        "job_id": job_id, "seq": seq, "chunk_count": len(groups), "token_count": sum(tokens),
        "status": BatchStatus.QUEUED,
    }).scalar()
    if batch_id is None:
        return None
    session.execute(insert(Chunk), [
        {"job_id": job_id, "document_id": document_id, "batch_seq": seq, "seq": i,
         "level": level, "text": text, "token_count": n,
         "char_start": min(s.char_start for s in group),
         "char_end": max(s.char_end for s in group)}
        for i, (group, text, n) in enumerate(zip(groups, texts, tokens, strict=True))
    ])
    return batch_id


def document_steps(session: Session, job: Job, document_ids: Iterable[int] | None = None
                   ) -> Iterable[tuple[int, Step]]:
    """(document id, step) for every row of the job's documents (or of those given), in
    document, level and seq order, with the result of the job's pipeline version."""
    query = (
        select(
            Chunk.document_id, Chunk.level, Chunk.seq, Chunk.char_start, Chunk.char_end,
            Result.status, Result.output, Result.tokens_in, Result.tokens_out, Result.cost,
            Result.cached, Result.latency_ms, Result.updated_at, Result.error_message,
            Result.tokens_in_cached,
        )
        .outerjoin(Result, and_(Result.chunk_id == Chunk.id,
                                Result.pipeline_version == job.pipeline_version))
        .where(Chunk.job_id == job.id)
        .order_by(Chunk.document_id, Chunk.level, Chunk.seq)
    )
    if document_ids is not None:
        query = query.where(Chunk.document_id.in_(list(document_ids)))
    for r in session.execute(query.execution_options(yield_per=5_000)):
        yield r.document_id, Step(
            r.level, r.seq, r.char_start, r.char_end, r.status, r.output,
            r.tokens_in or 0, r.tokens_out or 0, r.cost, bool(r.cached), r.latency_ms,
            r.updated_at, r.error_message, r.tokens_in_cached or 0,
        )


def by_document(rows: Iterable[tuple[int, Step]]) -> Iterable[tuple[int, list[Step]]]:
    """`document_steps` grouped: (document id, its steps)."""
    current: int | None = None
    steps: list[Step] = []
    for document_id, step in rows:
        if document_id != current and steps:
            assert current is not None
            yield current, steps
            steps = []
        current = document_id
        steps.append(step)
    if steps and current is not None:
        yield current, steps
