"""Job-level tasks: the chord callback that merges a job."""

from __future__ import annotations

from typing import Any

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from docqueue.models import JobStatus, store_id
from docqueue.tasks.batches import refuse_wrong_store, send_batches
from docqueue.tasks.celery import app, state_redis
from docqueue.tasks.runtime import WrongStoreError, runtime
from docqueue.workers.jobs.merging import merge_due
from docqueue.workers.jobs.merging import merge_job as merge
from docqueue.workers.jobs.reconcile import forget_published

UNTIL_FINAL_MAX_S = 30.0  # the longest a finished job waits for its merge after a rescue


@app.task(
    name="jobs.merge",
    bind=True,
    # The store or Redis restarting: try again, the merge is idempotent.
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=20,
)
def merge_job(self: Task, job_id: int, store: str | None = None,
              until_final: bool = False, segment: bool = False) -> dict[str, Any]:
    """Merge every result of the job into its documents and its totals.

    `until_final` (the callback of batches sent again): merge again later while the job still
    has unfinished chunks. A rescued batch runs ahead of the rest of its job, and the job's
    first chord cannot end before Redis gives back the dead delivery's message (an hour), so
    this callback is the one that merges the job at its end.

    `segment` (the callback of a streaming submission's segment): merge only when the job is
    ingested and none of its producer batches is open; otherwise a later segment's callback
    (the last to end) merges it. A job of many segments is merged about once, not per segment.
    """
    rt = runtime()
    try:
        rt.check_store(store, f"job {job_id}")
    except WrongStoreError as exc:
        refuse_wrong_store(self, exc)
    with rt.sessions.begin() as session:
        if segment and not merge_due(session, job_id):
            return {"job_id": job_id, "status": JobStatus.RUNNING, "merged": False}
        summary = merge(session, job_id)
        store = store or store_id(session)  # the reconciler's merge names none
    if summary is None:
        return {"job_id": job_id, "status": "missing"}
    send_batches(job_id, summary.new_batches, store)  # reduce levels a lost step left unmade
    if summary.unfinished == 0:  # nothing left to send: the reconciler can forget the job
        forget_published(state_redis(), job_id)
    elif until_final and summary.status == JobStatus.RUNNING:
        wait = min(UNTIL_FINAL_MAX_S, 2.0 * 2 ** min(self.request.retries, 4))
        raise self.retry(countdown=wait, max_retries=None)
    return {"job_id": job_id, "status": summary.status}
