"""The producer: stream a corpus into documents, chunks and batches, written in bulk.

Memory stays flat: documents are read one at a time and rows are flushed every few thousand
chunks. Nothing is published here; the caller publishes after the last commit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Batch, Chunk, Document, DocumentStatus, Job, JobStatus
from docqueue.workers.clock import utc_now
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
) -> Job:
    """Insert the job row in state pending.

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


class _Writer:
    """Writes each flush in a second thread while the producer chunks the next one.

    Chunking (tiktoken) and the store's round trips each took about half of the ingest
    (benchmarks/bench_producer.py), and both release the GIL, so they overlap. One write is in
    flight at a time: memory holds at most two flushes, and flushes commit in order, so document
    ids follow the submission order. A failed write is raised by the next `write` or `wait`.
    """

    def __init__(self, sessions: sessionmaker[Session], job_id: int) -> None:
        self.sessions, self.job_id = sessions, job_id
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docq-ingest")
        self._pending: Future[None] | None = None

    def write(
        self, docs: list[tuple[SourceDocument, list[Any]]], batches: list[dict[str, int]]
    ) -> None:
        self.wait()
        self._pending = self._pool.submit(self._commit, docs, batches)

    def _commit(
        self, docs: list[tuple[SourceDocument, list[Any]]], batches: list[dict[str, int]]
    ) -> None:
        with self.sessions.begin() as session:
            _write(session, self.job_id, docs, batches)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def ingest(
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: int,
    documents: Iterable[SourceDocument],
    slots: int = 1,
) -> SubmitReport:
    """Write documents, chunks and batches for a pending job, committing every few thousand.

    `slots`: how many batches the workers run at once, which sizes the job's last batches
    (`BatchSizes`). The last `BatchSizes.tail` chunks are numbered once the corpus has ended.
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
    pending_docs: list[tuple[SourceDocument, list[ChunkSpan]]] = []
    pending_chunks = 0
    writer = _Writer(sessions, job_id)
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
            if (pending_chunks >= FLUSH_CHUNKS + sizes.tail
                    or len(pending_docs) >= FLUSH_CHUNKS + sizes.tail):
                ready, pending_docs = _split_tail(pending_docs, sizes.tail)
                pending_chunks = sum(len(spans) for _, spans in pending_docs)
                writer.write(assigner.place_documents(ready, last=False), assigner.take_closed())
        placed = assigner.place_documents(pending_docs, last=True)
        assigner.finish()
        writer.write(placed, assigner.take_closed())
        writer.wait()
    finally:
        writer.close()
    report.batches = assigner.seq if report.chunks else 0

    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                documents_total=report.documents_accepted + report.documents_rejected,
                documents_rejected=report.documents_rejected,
                chunks_total=report.chunks,
                batches_total=report.batches,
            )
        )
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
) -> None:
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
    if batches:
        session.execute(insert(Batch), [{"job_id": job_id, **b} for b in batches])


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
