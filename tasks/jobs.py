"""Job-level tasks: the chord callback that merges a job."""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import OperationalError

from tasks.celery import app
from tasks.runtime import runtime
from workers.merging import merge_job as merge


@app.task(
    name="jobs.merge",
    autoretry_for=(OperationalError,),  # the store restarting: try again, the merge is idempotent
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=20,
)
def merge_job(job_id: int) -> dict[str, Any]:
    """Merge every result of the job into its documents and its totals."""
    with runtime().sessions.begin() as session:
        summary = merge(session, job_id)
    if summary is None:
        return {"job_id": job_id, "status": "missing"}
    return {"job_id": job_id, "status": summary.status}
