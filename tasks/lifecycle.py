"""Listing and purging jobs from Python and the CLI, and beat's retention purge.

The work is in workers/jobs/lifecycle.py; this module opens the store and, for beat,
registers `jobs.purge_expired`, which purges the final jobs older than DOCQ_RETENTION_DAYS
(`retention_entry`: once an hour; no entry while the setting is unset).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from docqueue.tasks.celery import app
from docqueue.tasks.failures import service_errors
from docqueue.tasks.runtime import resolve_endpoint, runtime
from docqueue.workers.jobs.lifecycle import (
    CacheScope,
    JobSummary,
    PurgeReport,
    check_purgeable,
    finished_before,
    list_jobs,
    purge,
)
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

RETENTION_EVERY_S = 3600.0


def jobs(status: str | None = None, limit: int = 20) -> list[JobSummary]:
    """The newest jobs, newest first (see workers/jobs/lifecycle.py `list_jobs`)."""
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        return list(list_jobs(session, status=status, limit=limit))


def older_than(days: float) -> list[int]:
    """Ids of the final jobs that finished over `days` days ago."""
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        return list(finished_before(session, days))


def ensure_purgeable(job_ids: Sequence[int]) -> None:
    """Raises JobNotFoundError or InputError (a job still running) before any question."""
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        check_purgeable(session, job_ids)


def purge_jobs(job_ids: Sequence[int], *, with_cache: bool = False) -> PurgeReport:
    """Delete the final jobs' rows in one transaction; `with_cache`: their cache entries too.

    Raises:
        JobNotFoundError, InputError: a job does not exist or is still running; nothing purged.
    """
    rt = runtime()
    scope = CacheScope(rt.settings, resolve_endpoint(rt.settings)) if with_cache else None
    with service_errors(rt.settings), rt.sessions.begin() as session:
        return purge(session, list(job_ids), cache_scope=scope)


@app.task(name="jobs.purge_expired")
def purge_expired() -> dict[str, Any]:
    """Beat: purge the final jobs older than DOCQ_RETENTION_DAYS (the cache is kept)."""
    days = runtime().settings.retention_days
    if days is None:
        return {"purged": 0}
    ids = older_than(days)
    report = purge_jobs(ids) if ids else PurgeReport()
    if ids:
        logger.info("retention: purged %d jobs older than %g days (%s)", report.jobs, days,
                    ", ".join(map(str, ids[:20])))
    return {"purged": report.jobs, "documents": report.documents}


def retention_entry(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat's entry for `jobs.purge_expired`, or none while DOCQ_RETENTION_DAYS is unset."""
    if settings.retention_days is None:
        return {}
    return {"jobs-retention": {"task": "jobs.purge_expired", "schedule": RETENTION_EVERY_S,
                               "options": {"expires": RETENTION_EVERY_S}}}
