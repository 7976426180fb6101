"""SQLAlchemy tables of the results store, the session factory and migrations."""

from models.db import (
    make_engine,
    make_sessionmaker,
    plan_for_now,
    store_id,
    upgrade,
    upsert_statement,
)
from models.tables import (
    FINAL_JOB_STATES,
    FINAL_RESULT_STATES,
    Base,
    Batch,
    BatchStatus,
    CachedResponse,
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobStatus,
    Result,
    ResultStatus,
    StoreIdentity,
)

__all__ = [
    "FINAL_JOB_STATES",
    "FINAL_RESULT_STATES",
    "Base",
    "Batch",
    "BatchStatus",
    "CachedResponse",
    "Chunk",
    "Document",
    "DocumentStatus",
    "Job",
    "JobStatus",
    "Result",
    "ResultStatus",
    "StoreIdentity",
    "make_engine",
    "make_sessionmaker",
    "plan_for_now",
    "store_id",
    "upgrade",
    "upsert_statement",
]
