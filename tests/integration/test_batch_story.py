"""A batch task's result tells its story (Flower shows it): counts, tokens, cost and failures
that agree with the store, and no chunk text."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from sqlalchemy import select

from docqueue.models import Chunk, Result
from docqueue.tasks import submit
from docqueue.tasks.runtime import runtime
from tests.integration.test_pipeline import corpus

pytestmark = pytest.mark.integration


def batch_results(client: redis.Redis) -> list[dict[str, Any]]:
    """The results of every finished `batches.process` task in the result backend."""
    found = []
    for key in client.scan_iter("celery-task-meta-*"):
        meta = json.loads(client.get(key) or b"{}")
        if meta.get("status") == "SUCCESS" and "chunks" in (meta.get("result") or {}):
            found.append(meta["result"])
    return found


def test_batch_results_add_up_to_the_store_and_name_each_failed_chunk(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis
) -> None:
    # Given a simulator that fails half its calls and two attempts per chunk at most
    sim = simulator("--fail-rate", "0.5", "--seed", "11")
    env = docq_env(sim.url, max_attempts=2, batch_max_chunks=5)
    workers(env, concurrency=2)

    # When a job of several batches ends
    docs = corpus(20)
    handle = submit(docs, "summarize", cache="off")
    handle.wait(timeout=120)

    # Then each batch's result says what its chunks came to, and together they are the store
    stories = [s for s in batch_results(redis_client) if s["job_id"] == handle.id]
    with runtime().sessions() as s:
        rows = list(s.scalars(select(Result).where(Result.job_id == handle.id)))
        texts = list(s.scalars(select(Chunk.text).where(Chunk.job_id == handle.id)))
    assert len(stories) == handle.status()["batches_total"] > 1
    assert all(s["state"] == "done" and s["unfinished"] == 0 for s in stories)
    assert sum(s["ok"] for s in stories) == sum(r.status == "ok" for r in rows)
    assert sum(s["errors"] for s in stories) == sum(r.status == "error" for r in rows) > 0
    assert sum(s["calls"] for s in stories) == sum(r.attempts for r in rows)
    assert sum(s["tokens_in"] for s in stories) == sum(r.tokens_in for r in rows)
    assert sum(s["tokens_out"] for s in stories) == sum(r.tokens_out for r in rows)
    failed = {chunk: why for s in stories for why, chunks in s["failed"].items()
              for chunk in chunks}
    assert set(failed) == {r.chunk_id for r in rows if r.status == "error"}
    assert all(why.startswith("RetryableLLMError: gave up after 2 attempts; last error: HTTP 5")
               for why in failed.values())
    shown = json.dumps(stories)
    assert not any(text[:40] in shown for text in texts)
