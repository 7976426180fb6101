"""SQLAlchemy tables of the results store, the session factory and migrations."""

from models.db import (
    make_engine,
    make_sessionmaker,
    plan_for_now,
    upgrade,
    upsert_statement,
)
from models.tables import (
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
)

__all__ = [
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
    "make_engine",
    "make_sessionmaker",
    "plan_for_now",
    "upgrade",
    "upsert_statement",
]
