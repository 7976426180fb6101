"""The producer: stream a corpus into documents, chunks and batches, written in bulk.

Memory stays flat: documents are read one at a time and rows are flushed every few thousand
chunks. The first flushes are small and come quickly (`FlushSizes`): each commit hands the
batches it closed to `on_commit`, which the online lane publishes at once as a chord segment
(streaming submission), so the first model call comes while the producer still reads. The job
stays `ingesting` until the last commit, which also writes its totals.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Batch, Chunk, Document, DocumentStatus, Job, JobStatus
from docqueue.workers.clock import monotonic_s, utc_now
from docqueue.workers.ingest.batching import Batcher, BatchSizes
from docqueue.workers.ingest.chunking import Chunker, ChunkSpan
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.ingest.sources import iter_documents
from docqueue.workers.jobs import sizing
from docqueue.workers.pipelines import Pipeline, build_pipeline
from docqueue.workers.settings import Settings
from docqueue.workers.tokens import count_tokens

logger = logging.getLogger(__name__)

FLUSH_CHUNKS = 5_000  # rows per bulk insert: big enough to amortise, small enough to stay flat
FIRST_FLUSH_CHUNKS = 16  # the first flush: one first batch (DOCQ_BATCH_MIN_CHUNKS by default)
FLUSH_EVERY_S = 0.3  # a flush at least this often once chunks wait (a slow source)
TAIL_WAIT_S = 0.25  # reading for longer, the producer sends batches before the tail is read

# (batch id, seq, chunks) of the batches one commit closed: what `on_commit` publishes.
Segment = list[tuple[int, int, int]]


@dataclass
class SubmitReport:
    """What `submit` tells the user: how many documents went in, which were turned away, why."""

    job_id: int
    documents_accepted: int = 0
    documents_rejected: int = 0
    chunks: int = 0
    batches: int = 0
    tokens: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # first 100 (id, reason)
    reasons: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "documents_accepted": self.documents_accepted,
            "documents_rejected": self.documents_rejected,
            "chunks": self.chunks,
            "batches": self.batches,
            "tokens": self.tokens,
            "rejected": [{"id": i, "error": e} for i, e in self.rejected],
        }


def create_job(
    session: Session,
    settings: Settings,
    pipeline: Pipeline,
    name: str | None = None,
    *,
    cache_policy: str = "use",
    budget_tokens: int | None = None,
    budget_cost: float | None = None,
    lane: str = "online",
    fallback_below: int | None = None,
    service_tier: str | None = None,
    inputs: dict[str, Any] | None = None,
) -> Job:
    """Insert the job row in state pending, ingesting until `ingest`'s last commit.

    `inputs`: how to read the corpus again (`docq resume` of a producer that died), or None.

    Raises:
        PipelineError: the model's context cannot hold a chunk or a reduce step.
    """
    if pipeline.chunked:
        sizing.chunk_tokens(settings, pipeline)  # refused here, before anything is recorded
    job = Job(
        reduce_tokens=sizing.reduce_group_tokens(settings, pipeline) if pipeline.reduces else None,
        name=name,
        pipeline=pipeline.name,
        pipeline_version=pipeline.version,
        options=pipeline.describe(),
        endpoint=settings.llm_base_url or "local",
        model=settings.model_name,
        mode=settings.mode,
        status=JobStatus.PENDING,
        cache_policy=cache_policy,
        budget_tokens=budget_tokens,
        budget_cost=budget_cost,
        lane=lane,
        fallback_below=fallback_below,
        service_tier=service_tier,
        ingesting=True,
        inputs=inputs,
    )
    session.add(job)
    session.flush()
    return job


class _BatchAssigner:
    """Numbers the batches `Batcher` forms from the chunks' token counts as the producer places
    them, each opened with its size from `BatchSizes`, and keeps each closed batch's size for
    its row."""

    def __init__(self, sizes: BatchSizes, max_tokens: int) -> None:
        self.sizes = sizes
        self._batcher: Batcher[int] = Batcher(max_items=sizes.size(0), max_tokens=max_tokens,
                                              tokens=int)
        self.seq = 0  # the open batch's number; batches count from 1
        self._closed: list[dict[str, int]] = []

    def place(self, tokens: int, remaining: int | None) -> int:
        """Return the batch seq for a chunk of `tokens` tokens, with `remaining` chunks left to
        place counting this one (None: the job's end is not in sight yet)."""
        if (closed := self._batcher.add(tokens)) is not None:
            self._keep(closed)
        if self._batcher.pending == 1:  # this chunk opened a batch
            self._batcher.max_items = self.sizes.size(self.seq, remaining)
            self.seq += 1
        return self.seq

    def place_documents(self, docs: list[tuple[SourceDocument, list[ChunkSpan]]], *,
                        last: bool) -> list[tuple[SourceDocument, list[Any]]]:
        """The documents with each chunk's batch seq; `last`: these chunks end the job."""
        remaining = sum(len(spans) for _, spans in docs) if last else None
        placed = []
        for doc, spans in docs:
            seqs = []
            for span in spans:
                seqs.append((self.place(span.token_count, remaining), span))
                if remaining is not None:
                    remaining -= 1
            placed.append((doc, seqs))
        return placed

    def _keep(self, batch: list[int]) -> None:
        self._closed.append({"seq": self.seq, "chunk_count": len(batch), "token_count": sum(batch)})

    def finish(self) -> None:
        if (closed := self._batcher.flush()) is not None:
            self._keep(closed)

    def take_closed(self) -> list[dict[str, int]]:
        out, self._closed = self._closed, []
        return out


def _split_tail(docs: list[tuple[SourceDocument, list[ChunkSpan]]], chunks: int
                ) -> tuple[list[tuple[SourceDocument, list[ChunkSpan]]],
                           list[tuple[SourceDocument, list[ChunkSpan]]]]:
    """(head, tail): the tail is the fewest last documents holding at least `chunks` chunks;
    none when all of them hold fewer (documents that were turned away hold none)."""
    held, cut = 0, len(docs)
    while cut > 0 and held < chunks:
        cut -= 1
        held += len(docs[cut][1])
    if held < chunks:
        return docs, []
    return docs[:cut], docs[cut:]


class FlushSizes:
    """When the producer commits what it has read: the first flush after `first` chunks (a
    first batch), each next one twice as large up to `most`, and one at least every `every_s`
    seconds once a chunk waits. Small first flushes put the first batches in the workers' hands
    within a fraction of a second; large later ones amortise the store's round trips."""

    def __init__(self, first: int = FIRST_FLUSH_CHUNKS, most: int = FLUSH_CHUNKS,
                 every_s: float = FLUSH_EVERY_S, now: float = 0.0) -> None:
        self.most, self.every_s = max(1, most), every_s
        self.limit = max(1, min(first, self.most))
        self._last = now

    def due(self, chunks: int, now: float) -> bool:
        """Whether `chunks` chunks ready to write (past the kept tail) should be written now."""
        return chunks >= self.limit or (chunks > 0 and now - self._last >= self.every_s)

    def flushed(self, now: float) -> None:
        self.limit = min(self.most, self.limit * 2)
        self._last = now


def held_tail(tail: int, read: int, elapsed_s: float) -> int:
    """Chunks the producer keeps unnumbered, having read `read` in `elapsed_s` seconds: the last
    `tail` (`BatchSizes`), so that the last batches shrink. A corpus read within TAIL_WAIT_S
    keeps that whole. Past it, while fewer than twice the tail are read, half of what was read:
    the first batches of a large or slow corpus go out then, not once `tail` chunks are read,
    and a corpus under twice the tail has its last batches shrink over half of it."""
    return tail if elapsed_s < TAIL_WAIT_S else min(tail, read // 2)


@dataclass
class _Recorded:
    """What the job's committed rows hold: its running totals, written with each commit."""

    documents: int = 0
    rejected: int = 0
    chunks: int = 0
    batches: int = 0


class _Writer:
    """Writes each flush in a second thread while the producer chunks the next one.

    Chunking (tiktoken) and the store's round trips each took about half of the ingest
    (benchmarks/bench_producer.py), and both release the GIL, so they overlap. One write is in
    flight at a time: memory holds at most two flushes, and flushes commit in order, so document
    ids follow the submission order. A failed write is raised by the next `write` or `wait`.

    Each commit also writes the job's totals so far; the first that holds batches marks the job
    running when `submit_early` (the online lane), and the last one ends its ingestion. After a
    commit, `on_commit` gets the batches it closed (still in this thread: they are published in
    order, and the last segment only after `ingesting` is committed false).
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: int, recorded: _Recorded,
                 on_commit: Callable[[Segment], None] | None, submit_early: bool) -> None:
        self.sessions, self.job_id, self.recorded = sessions, job_id, recorded
        self.on_commit, self.submit_early = on_commit, submit_early
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docq-ingest")
        self._pending: Future[None] | None = None

    def write(
        self, docs: list[tuple[SourceDocument, list[Any]]], batches: list[dict[str, int]],
        *, last: bool = False,
    ) -> None:
        self.wait()
        self._pending = self._pool.submit(self._commit, docs, batches, last)

    def _commit(
        self, docs: list[tuple[SourceDocument, list[Any]]], batches: list[dict[str, int]],
        last: bool,
    ) -> None:
        r = self.recorded
        with self.sessions.begin() as session:
            ids = _write(session, self.job_id, docs, batches)
            r.documents += len(docs)
            r.rejected += sum(1 for d, _ in docs if d.error is not None)
            r.chunks += sum(len(placed) for _, placed in docs)
            r.batches += len(batches)
            values: dict[str, Any] = {
                "documents_total": r.documents, "documents_rejected": r.rejected,
                "chunks_total": r.chunks, "batches_total": r.batches,
            }
            if last:
                values.update(ingesting=False, ingested_at=utc_now())
            session.execute(update(Job).where(Job.id == self.job_id).values(**values))
            if ids and self.submit_early:
                mark_submitted(session, self.job_id)  # running from its first segment on
        if ids and self.on_commit is not None:
            self.on_commit([(i, b["seq"], b["chunk_count"])
                            for i, b in zip(ids, batches, strict=True)])

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class ResumePoint:
    """Where a job whose producer died stands: what its committed rows hold, and the batch it
    left open (its chunks recorded, its row not), closed now."""

    recorded: _Recorded
    seq: int  # the last batch seq recorded
    closed: Segment  # the left-open batch, now with its row: to publish


def resume_point(session: Session, job_id: int) -> ResumePoint:
    """Read what the dead producer committed, and close the batch it left open.

    Documents commit with their chunks and in submission order, so the recorded documents are
    the first ones of the inputs (rejected ones included); the producer's tail was never
    written. The open batch's chunks were committed before its row: the row is added here.
    """
    job = session.get(Job, job_id)
    assert job is not None
    documents, rejected = session.execute(
        select(func.count(), func.count().filter(Document.status == DocumentStatus.REJECTED))
        .where(Document.job_id == job_id)
    ).one()
    chunks = session.scalar(select(func.count()).select_from(Chunk)
                            .where(Chunk.job_id == job_id, Chunk.level == 0)) or 0
    last_row = session.scalar(select(func.max(Batch.seq))
                              .where(Batch.job_id == job_id, Batch.seq > 0)) or 0
    open_rows = session.execute(
        select(Chunk.batch_seq, func.count(), func.sum(Chunk.token_count))
        .where(Chunk.job_id == job_id, Chunk.level == 0, Chunk.batch_seq > last_row)
        .group_by(Chunk.batch_seq).order_by(Chunk.batch_seq)
    ).all()
    rows = [{"seq": seq, "chunk_count": n, "token_count": int(t or 0)} for seq, n, t in open_rows]
    ids: list[int] = []
    if rows:
        ids = list(session.scalars(
            insert(Batch).returning(Batch.id, sort_by_parameter_order=True),
            [{"job_id": job_id, **b} for b in rows]))
    seq = max([last_row, *(b["seq"] for b in rows)])
    batches = session.scalar(select(func.count()).select_from(Batch)
                             .where(Batch.job_id == job_id, Batch.seq > 0)) or 0
    return ResumePoint(_Recorded(documents, rejected, chunks, batches), seq,
                       [(i, b["seq"], b["chunk_count"]) for i, b in zip(ids, rows, strict=True)])


def ingest(
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: int,
    documents: Iterable[SourceDocument],
    slots: int = 1,
    *,
    on_commit: Callable[[Segment], None] | None = None,
    submit_early: bool = False,
    resume: ResumePoint | None = None,
) -> SubmitReport:
    """Write documents, chunks and batches for a job, committing small flushes first.

    `slots`: how many batches the workers run at once, which sizes the job's last batches
    (`BatchSizes`). The last `BatchSizes.tail` chunks are numbered once the corpus has ended.
    `on_commit`: given the batches each commit closed, after it (streaming submission).
    `submit_early`: mark the job running in the first commit that holds batches. `resume`:
    continue a job whose producer died, from the documents after those it recorded.
    """
    report = SubmitReport(job_id=job_id)
    pipeline = _pipeline(sessions, job_id)
    split = _whole
    if pipeline.chunked:
        chunker = Chunker(sizing.chunk_tokens(settings, pipeline), settings.chunk_overlap_tokens)
        split = chunker.split
    sizes = BatchSizes(most=settings.batch_max_chunks, least=settings.batch_min_chunks,
                       slots=max(1, slots))
    assigner = _BatchAssigner(sizes, settings.batch_max_tokens)
    recorded = _Recorded()
    if resume is not None:
        recorded, assigner.seq = resume.recorded, resume.seq
        documents = islice(documents, resume.recorded.documents, None)
        if resume.closed and on_commit is not None:
            on_commit(resume.closed)
    pending_docs: list[tuple[SourceDocument, list[ChunkSpan]]] = []
    pending_chunks = 0
    flushes = FlushSizes(now=(started := monotonic_s()))
    writer = _Writer(sessions, job_id, recorded, on_commit, submit_early)
    try:
        for doc in documents:
            if doc.error is not None:
                report.documents_rejected += 1
                report.reasons[_reason_kind(doc.error)] += 1
                if len(report.rejected) < 100:
                    report.rejected.append((doc.external_id, doc.error))
                pending_docs.append((doc, []))
                continue
            assert doc.text is not None
            spans = split(doc.text)
            report.documents_accepted += 1
            report.chunks += len(spans)
            report.tokens += sum(s.token_count for s in spans)
            pending_docs.append((doc, spans))
            pending_chunks += len(spans)
            now = monotonic_s()
            hold = held_tail(sizes.tail, report.chunks, now - started)
            if (len(pending_docs) >= FLUSH_CHUNKS + sizes.tail
                    or flushes.due(pending_chunks - hold, now)):
                ready, pending_docs = _split_tail(pending_docs, hold)
                if ready:
                    pending_chunks = sum(len(spans) for _, spans in pending_docs)
                    writer.write(assigner.place_documents(ready, last=False),
                                 assigner.take_closed())
                    flushes.flushed(now)
        placed = assigner.place_documents(pending_docs, last=True)
        assigner.finish()
        writer.write(placed, assigner.take_closed(), last=True)
        writer.wait()
    finally:
        writer.close()
    report.batches = recorded.batches if recorded.chunks else 0
    logger.info(
        "job %s: %d documents accepted, %d rejected, %d chunks in %d batches",
        job_id,
        report.documents_accepted,
        report.documents_rejected,
        report.chunks,
        report.batches,
    )
    return report


def _pipeline(sessions: sessionmaker[Session], job_id: int) -> Pipeline:
    """The job's pipeline, which says whether and how large documents are cut."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None  # `ingest` is given a job it created
        return build_pipeline(job.pipeline, job.options)


def _whole(text: str) -> list[ChunkSpan]:
    """A document as its one chunk, for a pipeline that takes documents whole."""
    return [ChunkSpan(0, text, 0, len(text), count_tokens(text))]


def _reason_kind(error: str) -> str:
    """Group rejection messages for the summary line: the text before the first colon."""
    return error.split(":", 1)[0][:80]


def _write(
    session: Session,
    job_id: int,
    docs: list[tuple[SourceDocument, list[Any]]],
    batches: list[dict[str, int]],
) -> list[int]:
    """Insert the rows; returns the new batches' ids, in order."""
    if docs:
        rows = [
            {
                "job_id": job_id,
                "external_id": d.external_id,
                "source": d.source,
                "content_hash": d.content_hash,
                "size_bytes": d.size_bytes,
                "meta": d.metadata,
                "status": DocumentStatus.REJECTED if d.error else DocumentStatus.PENDING,
                "error": d.error,
                "chunk_count": len(placed),
            }
            for d, placed in docs
        ]
        ids = session.scalars(
            insert(Document).returning(Document.id, sort_by_parameter_order=True), rows
        ).all()
        chunk_rows = [
            (job_id, doc_id, batch_seq, span.seq, span.text, span.char_start, span.char_end,
             span.token_count)
            for doc_id, (_, placed) in zip(ids, docs, strict=True)
            for batch_seq, span in placed
        ]
        if chunk_rows:
            _insert_chunks(session, chunk_rows)
    if not batches:
        return []
    return list(session.scalars(
        insert(Batch).returning(Batch.id, sort_by_parameter_order=True),
        [{"job_id": job_id, **b} for b in batches]))


_CHUNK_COLUMNS = ("job_id", "document_id", "batch_seq", "seq", "text", "char_start", "char_end",
                  "token_count")


def _insert_chunks(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """Insert chunk rows (in _CHUNK_COLUMNS order) in the session's transaction.

    On PostgreSQL through COPY: the chunks are most of what the producer writes, and COPY took
    about half the time of the ORM's bulk INSERT (and far less of the producer's CPU, which the
    chunker needs) in benchmarks/bench_producer.py. Elsewhere (SQLite) an executemany.
    """
    if session.get_bind().dialect.name != "postgresql":
        session.execute(insert(Chunk), [dict(zip(_CHUNK_COLUMNS, r, strict=True)) for r in rows])
        return
    raw = session.connection().connection.driver_connection
    assert raw is not None  # a live connection inside the transaction
    statement = f"COPY {Chunk.__tablename__} ({', '.join(_CHUNK_COLUMNS)}) FROM STDIN"
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def discard_job(session: Session, job_id: int) -> None:
    """Delete a pending job that accepted no document, with its rejected documents' rows.

    A job with nothing to run would only sit in `docq status` as an empty success; the caller
    reports the rejections instead. Nothing else refers to a pending job: no chunk, batch or
    result row exists for it.
    """
    session.execute(delete(Batch).where(Batch.job_id == job_id))
    session.execute(delete(Document).where(Document.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id, Job.status == JobStatus.PENDING))


def mark_submitted(session: Session, job_id: int) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.PENDING)
        .values(status=JobStatus.RUNNING, submitted_at=utc_now())
    )


def batch_ids(session: Session, job_id: int) -> Iterator[tuple[int, int, int]]:
    """(batch id, seq, chunk count) of a job's unfinished batches, in order."""
    rows = session.execute(
        select(Batch.id, Batch.seq, Batch.chunk_count)
        .where(Batch.job_id == job_id, Batch.status != "done")
        .order_by(Batch.seq)
    )
    for row in rows:
        yield row.id, row.seq, row.chunk_count


def read_sources(inputs: Iterable[Any], settings: Settings) -> Iterator[SourceDocument]:
    return iter_documents(inputs, max_bytes=settings.max_document_bytes)
