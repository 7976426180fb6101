"""The results store: jobs, documents, chunks, batches and one result per chunk."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def table_of(model: type[Base]) -> Table:
    """The model's `Table`, for Core statements.

    SQLAlchemy types `__table__` as any FromClause; every model here maps one Table.
    """
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} maps {type(table).__name__}, not a Table")
    return table


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these states is done: nothing more runs for it unless `docq retry` reopens it.
FINAL_JOB_STATES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED}
)


class DocumentStatus(enum.StrEnum):
    PENDING = "pending"
    REJECTED = "rejected"
    OK = "ok"
    PARTIAL = "partial"
    ERROR = "error"


class BatchStatus(enum.StrEnum):
    QUEUED = "queued"
    DONE = "done"


class ResultStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    RETRY = "retry"  # the only state that is not final: a transient failure awaiting retry
    SKIPPED_BUDGET = "skipped_budget"
    CANCELLED = "cancelled"


FINAL_RESULT_STATES = (
    ResultStatus.OK,
    ResultStatus.ERROR,
    ResultStatus.SKIPPED_BUDGET,
    ResultStatus.CANCELLED,
)


# States are stored as plain strings, not native enums: a new state needs no ALTER TYPE.
STATE = String(16)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    pipeline: Mapped[str] = mapped_column(String(64))
    pipeline_version: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    endpoint: Mapped[str] = mapped_column(String(500))
    model: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(STATE, default=JobStatus.PENDING, index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    cache_policy: Mapped[str] = mapped_column(String(8), default="use")  # use, refresh or off
    budget_tokens: Mapped[int | None] = mapped_column(BigInteger)
    budget_cost: Mapped[float | None] = mapped_column(Float)
    lane: Mapped[str] = mapped_column(String(8), default="online", server_default="online")
    # Batch lane: once this few chunks are left after a provider batch, they go online.
    fallback_below: Mapped[int | None] = mapped_column(Integer)
    service_tier: Mapped[str | None] = mapped_column(String(16))  # online: auto, default, flex
    # Tokens of outputs one reduce step takes, fixed at submit from the model's context so that
    # every worker groups a document's outputs alike; None: the pipeline merges without a reduce.
    reduce_tokens: Mapped[int | None] = mapped_column(Integer)

    documents_total: Mapped[int] = mapped_column(default=0)
    documents_rejected: Mapped[int] = mapped_column(default=0)
    chunks_total: Mapped[int] = mapped_column(default=0)
    batches_total: Mapped[int] = mapped_column(default=0)

    chunks_ok: Mapped[int] = mapped_column(default=0)
    chunks_error: Mapped[int] = mapped_column(default=0)
    chunks_other: Mapped[int] = mapped_column(default=0)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    # Of tokens_in: those the provider read from its prompt cache (billed at the cached rate).
    tokens_in_cached: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    cost: Mapped[float | None] = mapped_column(Float)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    chunks_per_s: Mapped[float | None] = mapped_column(Float)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Streaming submission: the producer publishes batches while it still reads. `ingesting`
    # holds until its last rows and the job's totals are committed (then `ingested_at`); a
    # merge never finalizes an ingesting job. `inputs`: the resolved input paths (and table
    # spec), so `docq resume` can read them again after a producer died; None for an iterable.
    ingesting: Mapped[bool] = mapped_column(default=False, server_default=false())
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (Index("ix_documents_job_external", "job_id", "external_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(1000))
    source: Mapped[str | None] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    status: Mapped[str] = mapped_column(STATE, default=DocumentStatus.PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    chunk_count: Mapped[int] = mapped_column(default=0)
    output: Mapped[Any | None] = mapped_column(JSON)
    tokens_in: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_in_cached: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens_out: Mapped[int] = mapped_column(BigInteger, default=0)
    cost: Mapped[float | None] = mapped_column(Float)


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # 1, 2, ... for the producer's batches; below zero for a document's reduce level
    # (workers/jobs/reducing.py), which needs 64 bits.
    seq: Mapped[int] = mapped_column(BigInteger)
    chunk_count: Mapped[int] = mapped_column(default=0)
    token_count: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(STATE, default=BatchStatus.QUEUED)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (
        # One row per (document, level, place): level 0 is the document's text, level L > 0
        # the reduce steps over level L-1's outputs (workers/jobs/reducing.py). Unique, so a
        # reduce step is created once however many workers schedule it.
        Index("ix_chunks_document_level_seq", "document_id", "level", "seq", unique=True),
        Index("ix_chunks_job_batch", "job_id", "batch_seq"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    # The batch is (job_id, batch_seq): the producer writes chunks before it knows batch ids.
    batch_seq: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(Integer)
    level: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    text: Mapped[str] = mapped_column(Text)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer)
    # The lease: which delivery of a batch may call the model for this chunk, and until when.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The poison guard (workers/batch/leases.py): how many deliveries died with this chunk in
    # flight, and how many of them held it alone; `leased_alone` says the lease is such a one.
    deaths: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    deaths_alone: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    leased_alone: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class CachedResponse(Base):
    """A model answer keyed by everything that shapes it; a hit costs no call."""

    __tablename__ = "response_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    output: Mapped[Any | None] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    tokens_in: Mapped[int] = mapped_column(default=0)
    tokens_out: Mapped[int] = mapped_column(default=0)
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("chunk_id", "pipeline_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    chunk_id: Mapped[int] = mapped_column(ForeignKey("chunks.id", ondelete="CASCADE"))
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    pipeline_version: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(STATE)
    output: Mapped[Any | None] = mapped_column(JSON)
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    tokens_in: Mapped[int] = mapped_column(default=0)
    # Of tokens_in: those the provider read from its prompt cache (billed at the cached rate).
    tokens_in_cached: Mapped[int] = mapped_column(default=0, server_default="0")
    tokens_out: Mapped[int] = mapped_column(default=0)
    cost: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(default=0)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


# -- the batch lane's ledger (workers/jobs/lane.py) ----------------------------------------------


class Lane(enum.StrEnum):
    """How a job's chunks reach the model."""

    ONLINE = "online"  # one call per chunk, through the workers
    BATCH = "batch"  # files sent to the provider's Batch API, polled by beat


class LedgerState(enum.StrEnum):
    """A provider batch's own progress in the ledger; each step is committed before the next
    provider call, so a crash anywhere leaves a row that says what is left to do."""

    UPLOADING = "uploading"  # the row and its chunk links exist; the file may or may not
    UPLOADED = "uploaded"  # the file is at the provider; the batch may or may not be
    CREATED = "created"  # the batch is at the provider: poll it
    CLOSED = "closed"  # its outcome is recorded; its chunks are free again if unfinished


class ProviderBatch(Base):
    """One file and batch sent to the provider's Batch API for one job."""

    __tablename__ = "provider_batches"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(STATE, default=LedgerState.UPLOADING)
    provider_status: Mapped[str | None] = mapped_column(STATE)  # as the provider reports it
    input_file_id: Mapped[str | None] = mapped_column(String(200))
    provider_batch_id: Mapped[str | None] = mapped_column(String(200))
    output_file_id: Mapped[str | None] = mapped_column(String(200))
    error_file_id: Mapped[str | None] = mapped_column(String(200))
    requests: Mapped[int] = mapped_column(default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # enqueued prompt tokens
    completed: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    polled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ProviderBatchChunk(Base):
    """A chunk's place in a provider batch; `live` until that batch is closed.

    The partial unique index keeps a chunk in at most one live provider batch.
    """

    __tablename__ = "provider_batch_chunks"
    __table_args__ = (
        Index("ux_provider_batch_chunks_live", "chunk_id", unique=True,
              postgresql_where=text("live"), sqlite_where=text("live")),
    )

    provider_batch_id: Mapped[int] = mapped_column(
        ForeignKey("provider_batches.id", ondelete="CASCADE"), primary_key=True)
    chunk_id: Mapped[int] = mapped_column(ForeignKey("chunks.id", ondelete="CASCADE"),
                                          primary_key=True)
    live: Mapped[bool] = mapped_column(Boolean, default=True)


# -- schedules (workers/jobs/schedules.py) ---------------------------------------------------------


class RunStatus(enum.StrEnum):
    INGESTING = "ingesting"  # reading the source and submitting: holds the schedule's lock
    SKIPPED = "skipped"  # an earlier run of the schedule was still going
    UNCHANGED = "unchanged"  # nothing new or changed: no job
    RUNNING = "running"  # its job was submitted and has not ended
    # A run that settles takes its job's final state, so these are the job's own values.
    SUCCEEDED = JobStatus.SUCCEEDED.value
    PARTIAL = JobStatus.PARTIAL.value
    FAILED = JobStatus.FAILED.value


class ScheduleRun(Base):
    """One window of one schedule; the unique key makes a duplicate tick a no-op."""

    __tablename__ = "schedule_runs"
    __table_args__ = (UniqueConstraint("schedule", "window_start"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    schedule: Mapped[str] = mapped_column(String(200))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(STATE)
    reason: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    documents_seen: Mapped[int] = mapped_column(default=0)
    documents_new: Mapped[int] = mapped_column(default=0)
    documents_changed: Mapped[int] = mapped_column(default=0)
    documents_unchanged: Mapped[int] = mapped_column(default=0)
    documents_rejected: Mapped[int] = mapped_column(default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ScheduleDocument(Base):
    """A schedule's baseline: each document's content hash as of its last successful run."""

    __tablename__ = "schedule_documents"

    schedule: Mapped[str] = mapped_column(String(200), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("schedule_runs.id", ondelete="SET NULL")
    )


class StoreIdentity(Base):
    """One row: a random id given to this store when its schema was made (migration 0003).

    A producer stamps it on every message it sends; a worker whose store has another id is
    pointed at the wrong database and says so instead of working on look-alike ids.
    """

    __tablename__ = "store_identity"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
