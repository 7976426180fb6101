"""The chord header task: process one batch. It never raises: errors become result rows.

Its result (what Flower shows) is the batch's story: counts, tokens, cost and the ids of its
failed chunks under each one-line reason (workers/batch/story.py). The merge ignores it
(`merge_job.si`). A batch that waits is retried with a `Waiting` whose words are why: the
trouble line when its calls met a shared cause (workers/batch/trouble.py), so Flower's retried
task says what the status views say.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Retry

from docqueue.tasks.celery import app, state_redis
from docqueue.tasks.runtime import WrongStoreError, runtime
from docqueue.workers.batch.processing import run_batch
from docqueue.workers.provider.retry import backoff_s

logger = logging.getLogger(__name__)

MAX_CRASH_RETRIES = 8  # unexpected failures (store down, bugs) before the batch is left to resume


class Waiting(Exception):
    """Why a batch is retried later. Celery sends its repr in the `task-retried` event Flower
    shows, so the repr is the words alone."""

    def __repr__(self) -> str:
        return str(self)


# The result is the batch's story; the task event Flower reads carries this much of its repr.
@app.task(name="batches.process", bind=True, max_retries=None, resultrepr_maxsize=2048)
def process_batch(self: Task, batch_id: int, store: str | None = None) -> dict[str, Any]:
    """Call the model for every unfinished chunk of the batch and record its result.

    `store` is the identity of the results store the producer wrote the batch to.
    """
    rt = runtime()
    s = rt.settings
    try:
        rt.check_store(store, f"batch {batch_id}")
    except WrongStoreError as exc:
        refuse_wrong_store(self, exc)
    # Unique per delivery: two copies of one message must not share a lease.
    owner = f"{os.getpid()}:{uuid.uuid4().hex[:20]}"
    budget_s = s.task_soft_time_limit_s - s.llm_timeout_s - 15
    try:
        message = reservation_tag(self.request.id, self.request.retries)
        outcome = rt.run(run_batch(rt.services(), batch_id, owner, budget_s, message))
    except Retry:
        raise
    except Exception as exc:  # the boundary: a chord header must not fail
        crashes = self.request.retries
        if crashes < MAX_CRASH_RETRIES:
            wait = backoff_s(crashes, base_s=2, cap_s=s.retry_backoff_max_s, floor_s=1)
            logger.warning("batch %s: %s: %s; retrying in %.0fs", batch_id,
                           type(exc).__name__, exc, wait)
            raise self.retry(countdown=wait, max_retries=None) from None
        logger.exception("batch %s: giving up after %d failures; the reconciler will send it "
                         "again (or `docq resume`)", batch_id, crashes)
        _mark_abandoned(batch_id)
        return {"batch_id": batch_id, "state": "abandoned"}
    finally:
        # Only now: until its delivery has registered its own heartbeat, the reservation is
        # all that stands for the message. (Both dead at once are one rescue.)
        _unreserve(self)
    if outcome.state == "retry":
        countdown = min(max(outcome.retry_in_s, 0.1), s.retry_backoff_max_s)
        why = outcome.trouble["message"] if outcome.trouble else outcome.reason
        logger.info("batch %s: %s; again in %.1fs", batch_id, why, countdown)
        raise self.retry(countdown=countdown, max_retries=None, exc=Waiting(why))
    if outcome.state == "done":
        _advance(batch_id, store)
    return {"state": outcome.state, **_story(batch_id, outcome.state)}


def _story(batch_id: int, state: str) -> dict[str, Any]:
    """What the batch came to, for Flower (workers/batch/story.py); a chord header must not
    raise, so a store that cannot say gives the bare batch id."""
    from docqueue.workers.batch.story import batch_story

    if state != "done":
        return {"batch_id": batch_id}
    try:
        with runtime().sessions() as session:
            return batch_story(session, batch_id) or {"batch_id": batch_id}
    except Exception as exc:
        logger.warning("batch %s: cannot read its story: %s: %s", batch_id, type(exc).__name__,
                       exc)
        return {"batch_id": batch_id}


def _advance(batch_id: int, store: str | None) -> None:
    """Move the batch's documents on at once: send the reduce levels it made ready, and merge
    the job when this reduce batch was its last open one (its chord's callback ran before).

    Before the task returns, so a worker killed here has its message delivered again and this
    runs again; what still slips (the store or Redis down just now) the job's merge makes up.
    """
    from docqueue.workers.jobs.merging import after_batch

    try:
        with runtime().sessions.begin() as session:
            advance = after_batch(session, batch_id)
        if advance is None:
            return
        send_batches(advance.job_id, advance.new_batches, store)
        if advance.reduce_batch and advance.job_idle:
            app.send_task("jobs.merge", (advance.job_id,), {"store": store},
                          argsrepr=f"job={advance.job_id}", kwargsrepr="{}")
    except Exception:  # a chord header must not fail; the job's merge catches up
        logger.exception("batch %s: could not move its documents on to their reduce step",
                         batch_id)


def send_batches(job_id: int, batch_ids: list[int], store: str | None) -> None:
    """Queue one task per batch (a document's reduce level), ids only, outside any chord."""
    for batch_id in batch_ids:
        process_batch.apply_async((batch_id,), {"store": store},
                                  argsrepr=f"job={job_id} reduce batch={batch_id}",
                                  kwargsrepr="{}")


def refuse_wrong_store(task: Task, exc: WrongStoreError) -> NoReturn:
    """Put the message back for a worker of the right store, and stop this misconfigured one:
    working on it here would touch look-alike ids of another store's jobs."""
    logger.critical("%s; stopping this worker", exc)
    task.app.control.shutdown(destination=[task.request.hostname])
    raise task.retry(countdown=5, max_retries=None) from None


def reservation_tag(task_id: str, retries: int | None) -> str:
    """One message of a batch task: a retry keeps the task id and counts one more retry."""
    return f"{task_id}:{retries or 0}"


def _unreserve(task: Task) -> None:
    from docqueue.workers.batch.liveness import unreserve

    try:
        unreserve(state_redis(), reservation_tag(task.request.id, task.request.retries))
    except Exception as exc:
        logger.warning("batch %s: cannot clear its reservation: %s", task.request.args, exc)


def _mark_abandoned(batch_id: int) -> None:
    """Tell the reconciler this batch has no message left, so it is sent again."""
    from docqueue.workers.jobs.reconcile import mark_abandoned

    try:
        mark_abandoned(state_redis(), batch_id)
    except Exception:  # Redis down too: `docq resume JOB` still finds the batch unfinished
        logger.exception("batch %s: could not record it as abandoned", batch_id)
