"""Cancel a job, retry what failed, or estimate a job before submitting it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy import select

from docqueue.models import Job, Lane
from docqueue.tasks.publish import forget_chord_results, publish
from docqueue.tasks.runtime import resolve_redis, runtime
from docqueue.workers import keys
from docqueue.workers.batch.guard import StopReason
from docqueue.workers.jobs import control
from docqueue.workers.jobs.submission import read_sources
from docqueue.workers.pipelines import build_pipeline


def _redis() -> redis.Redis:
    return redis.Redis.from_url(resolve_redis(runtime().settings), socket_timeout=10)


def cancel(job_id: int) -> bool:
    """Cancel a job: queued batches close at once, running ones before their next model call.

    Returns False when the job had already ended. The merge still runs, so the job ends
    `cancelled` with every chunk accounted for.
    """
    with runtime().sessions.begin() as session:
        changed = control.cancel_job(session, job_id)
    if changed:
        client = _redis()
        client.set(keys.job_stop(job_id), StopReason.CANCELLED)
        client.close()
    return changed


def retry(job_id: int, *, include_skipped: bool = False, budget_tokens: int | None = None,
          budget_cost: float | None = None) -> int:
    """Run the job's failed chunks again (and budget-skipped ones) as a new chord, then merge.

    A batch-lane job's chunks go in the next provider batch beat's `lane.poll` sends instead.
    Returns how many chunks run again.
    """
    with runtime().sessions.begin() as session:
        n = control.reopen_failed(session, job_id, include_skipped=include_skipped,
                                  budget_tokens=budget_tokens, budget_cost=budget_cost)
        lane = session.scalar(select(Job.lane).where(Job.id == job_id))
    if n:
        client = _redis()
        # A raised budget lets the skipped chunks run; a refused key is tried again (with the
        # workers' DOCQ_LLM_API_KEY set right, their first call says whether it now passes).
        client.delete(keys.job_stop(job_id), keys.job_refusal(job_id), keys.job_trouble(job_id))
        client.close()
    if n and lane == Lane.ONLINE:
        publish(job_id)
        forget_chord_results()
    return n


def estimate(sources: str | os.PathLike[str] | Iterable[Any], pipeline: str = "summarize",
             **options: Any) -> dict[str, Any]:
    """Tokens and cost a job would take; records and calls nothing."""
    settings = runtime().settings
    pipe = build_pipeline(pipeline, {k: v for k, v in options.items() if v is not None})
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return control.estimate(settings, pipe, read_sources(sources, settings)).as_dict()
