"""The batch lane's tasks: beat's `lane.poll` sends one `lane.advance(job_id)` per batch-lane job.

`lane.advance` runs workers/jobs/lane.py's `advance` under a per-job Redis lock, renewed while
it runs (two copies of the task wait for nothing: the second returns at once), and once every
chunk of the job has a final result and no provider batch is live, it queues `jobs.merge`, the
online lane's chord callback. Both tasks carry ids only; losing Redis (the lock, queued messages)
loses nothing the ledger in the store does not hold, and the next tick finds the same work again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.exceptions import LockError, RedisError

from docqueue.models import store_id
from docqueue.tasks.celery import app, state_redis
from docqueue.tasks.jobs import merge_job
from docqueue.tasks.publish import publish
from docqueue.tasks.runtime import resolve_endpoint, runtime
from docqueue.workers import keys
from docqueue.workers.jobs.lane import advance, lane_jobs
from docqueue.workers.jobs.lane_ledger import Advance
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

# A killed holder blocks its job's lane this long at most; a live one renews it every third.
LOCK_TTL_S = 60


def poll_entry(settings: Settings) -> dict[str, Any]:
    """The beat entry for `lane.poll`; a tick that waited a whole period is dropped."""
    every_s = settings.batch_poll_s
    return {"task": "lane.poll", "schedule": every_s, "options": {"expires": every_s}}


@app.task(name="lane.poll")
def poll_lane() -> dict[str, Any]:
    """Beat: queue one `lane.advance` for each batch-lane job that may need work."""
    rt = runtime()
    with rt.sessions.begin() as session:
        job_ids = lane_jobs(session)
    for job_id in job_ids:
        advance_job.apply_async((job_id,), argsrepr=f"job={job_id}", kwargsrepr="{}",
                                expires=rt.settings.batch_poll_s * 4)
    return {"jobs": job_ids}


@app.task(name="lane.advance")
def advance_job(job_id: int) -> dict[str, Any]:
    """Send, poll and record the job's provider batches; merge the job once it is done."""
    with _job_lock(job_id) as held:
        if not held:
            return {"job_id": job_id, "skipped": "another advance of this job is running"}
        done = advance_now(job_id)
    if done.online:
        publish(job_id)
    if done.ready:
        with runtime().sessions.begin() as session:
            store = store_id(session)
        merge_job.apply_async((job_id,), {"store": store}, argsrepr=f"job={job_id}",
                              kwargsrepr="{}")
    return done.as_dict()


def resume_lane(job_ids: list[int] | None) -> list[dict[str, Any]]:
    """`docq resume`: advance the batch-lane jobs (all, or those of `job_ids`) here and now,
    and merge those that are done; one record per job."""
    rt = runtime()
    with rt.sessions.begin() as session:
        wanted = [j for j in lane_jobs(session) if job_ids is None or j in job_ids]
    records = []
    for job_id in wanted:
        with _job_lock(job_id) as held:
            if not held:
                records.append({"job_id": job_id, "skipped": "beat is advancing it right now"})
                continue
            done = advance_now(job_id)
        record = done.as_dict()
        if done.online:
            publish(job_id)
        if done.ready:
            record["merged"] = merge_job(job_id)["status"]
        records.append(record)
    return records


@contextmanager
def _job_lock(job_id: int) -> Iterator[bool]:
    """The job's lane lock, renewed by a thread while held; yields whether it was taken."""
    lock = state_redis().lock(keys.lane_lock(job_id), timeout=LOCK_TTL_S, thread_local=False)
    if not lock.acquire(blocking=False):
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LOCK_TTL_S / 3):
            try:
                lock.reacquire()
            except (LockError, RedisError):  # lost (Redis flushed, or down): the ledger holds
                return

    renewer = threading.Thread(target=renew, name=f"docq-lane-lock-{job_id}", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        # It expired (or Redis was flushed): nothing to release.
        with contextlib.suppress(LockError, RedisError):
            lock.release()


def advance_now(job_id: int) -> Advance:
    """One `advance` of the job in this process (the task, and `docq resume`)."""
    from docqueue.workers.provider.batch_api import OpenAIBatchApi, RequestBodies

    rt = runtime()
    base_url = resolve_endpoint(rt.settings)
    api = OpenAIBatchApi(rt.settings, base_url)
    try:
        done = advance(rt.sessions, rt.settings, api, RequestBodies(rt.settings, base_url),
                       base_url, job_id)
    finally:
        api.close()
    if done.sent or done.closed:
        logger.info("job %s: %s", job_id, done.as_dict())
    return done
