"""Job-level tasks: the chord callback that merges a job."""

from __future__ import annotations

from typing import Any

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from tasks.batches import refuse_wrong_store
from tasks.celery import app, broker_redis
from tasks.runtime import WrongStoreError, runtime
from workers.jobs.merging import merge_job as merge
from workers.jobs.reconcile import forget_published


@app.task(
    name="jobs.merge",
    bind=True,
    # The store or Redis restarting: try again, the merge is idempotent.
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=20,
)
def merge_job(self: Task, job_id: int, store: str | None = None) -> dict[str, Any]:
    """Merge every result of the job into its documents and its totals."""
    rt = runtime()
    try:
        rt.check_store(store, f"job {job_id}")
    except WrongStoreError as exc:
        refuse_wrong_store(self, exc)
    with rt.sessions.begin() as session:
        summary = merge(session, job_id)
    if summary is None:
        return {"job_id": job_id, "status": "missing"}
    if summary.unfinished == 0:  # nothing left to send: the reconciler can forget the job
        forget_published(broker_redis(), job_id)
    return {"job_id": job_id, "status": summary.status}
