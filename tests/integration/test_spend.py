"""Never pay twice, never overspend: the response cache, budgets, retry and cancel."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import select

from docqueue.models import Chunk, Result
from docqueue.tasks import submit
from docqueue.tasks.control import cancel, retry
from docqueue.tasks.runtime import runtime

pytestmark = pytest.mark.integration

def corpus(n: int, changed: int | None = None) -> list[tuple[str, str]]:
    """Documents whose chunks differ from each other's, so the cache only matches on purpose."""

    def text(i: int) -> str:
        head = f"Document {i}{' (revised)' if i == changed else ''}."
        return head + "".join(f" Boat {i}-{j} left harbour {i} before dawn and came back at "
                              f"noon with catch {j}." for j in range(6))

    return [(f"doc-{i}", text(i)) for i in range(n)]


def results(job_id: int) -> list[Result]:
    with runtime().sessions() as s:
        return list(s.scalars(select(Result).where(Result.job_id == job_id)))


def test_an_unchanged_corpus_makes_no_model_call_and_a_changed_document_only_its_own(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a finished job over five documents
    sim = simulator("--seed", "1")
    workers(docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0))
    first = submit(corpus(5), "summarize")
    assert first.wait(timeout=60)["status"] == "succeeded"
    calls_first = sim.stats()["requests_total"]
    assert calls_first == len(results(first.id))
    # When the same corpus is submitted again
    second = submit(corpus(5), "summarize")
    final = second.wait(timeout=60)
    # Then no model call was made: every result is cached, with zero tokens and zero cost
    assert final["status"] == "succeeded"
    assert sim.stats()["requests_total"] == calls_first
    again = results(second.id)
    assert all(r.cached and r.tokens_in == r.tokens_out == 0 and r.cost == 0 for r in again)
    outputs = {d["id"]: d["output"]["summary"] for d in second.results()}
    assert outputs == {d["id"]: d["output"]["summary"] for d in first.results()}
    assert all(d["output"]["made"]["calls"] == 0 for d in second.results())
    # When one document's text changes
    third = submit(corpus(5, changed=2), "summarize")
    assert third.wait(timeout=60)["status"] == "succeeded"
    # Then only that document's chunks were sent to the model
    fresh = [r for r in results(third.id) if not r.cached]
    with runtime().sessions() as s:
        from docqueue.models import Document
        changed_doc = s.scalar(select(Document.id).where(Document.job_id == third.id,
                                                         Document.external_id == "doc-2"))
    assert fresh and {r.document_id for r in fresh} == {changed_doc}
    assert sim.stats()["requests_total"] == calls_first + len(fresh)


def test_cache_off_and_refresh_call_the_model(simulator: Any, docq_env: Any,
                                              workers: Any) -> None:
    # Given a cached corpus
    sim = simulator("--seed", "2")
    workers(docq_env(sim.url, chunk_tokens=60, chunk_overlap_tokens=0))
    submit(corpus(2), "summarize").wait(timeout=60)
    before = sim.stats()["requests_total"]
    # When it is submitted with the cache off, then with refresh
    off = submit(corpus(2), "summarize", cache="off")
    off.wait(timeout=60)
    refreshed = submit(corpus(2), "summarize", cache="refresh")
    refreshed.wait(timeout=60)
    # Then both called the model for every chunk
    n = len(results(off.id))
    assert sim.stats()["requests_total"] == before + 2 * n
    assert not any(r.cached for r in results(off.id) + results(refreshed.id))


@pytest.mark.parametrize(("inflight", "processes"), [(2, 2), (1, 1)])
def test_a_budget_stops_spending_within_one_round_of_calls_in_flight(
    simulator: Any, docq_env: Any, workers: Any, inflight: int, processes: int
) -> None:
    # Given slow calls, at most inflight × processes in flight, and a budget for a few calls
    sim = simulator("--latency-ms", "200", "--seed", "3")
    workers(docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, worker_inflight=inflight,
                     batch_max_chunks=5), concurrency=processes)
    budget = 1500
    # When a job of about 40 chunks runs under it
    handle = submit(corpus(10), "summarize", budget_tokens=budget, cache="off")
    final = handle.wait(timeout=90)
    # Then it ended partial, the rest skipped, and the overshoot is at most one round in flight
    rows = results(handle.id)
    states = Counter(r.status for r in rows)
    assert final["status"] == "partial" and "budget" in final["reason"], final
    assert states["skipped_budget"] > 0 and states["ok"] > 0
    spent = sum(r.tokens_in + r.tokens_out for r in rows)
    per_call = max(r.tokens_in + r.tokens_out for r in rows if r.status == "ok")
    in_flight = inflight * processes
    assert budget <= spent <= budget + in_flight * per_call
    # (identical chunks of different documents are answered from the cache, at no cost)
    assert sim.stats()["requests_total"] == sum(1 for r in rows if r.status == "ok"
                                                and not r.cached)


def chunk_levels(job_id: int) -> dict[int, int]:
    with runtime().sessions() as s:
        return dict(s.execute(select(Chunk.id, Chunk.level).where(Chunk.job_id == job_id)).all())


def test_retry_runs_exactly_the_failed_chunks_again(simulator: Any, docq_env: Any,
                                                    workers: Any) -> None:
    # Given a job where about a third of the chunks failed (one attempt each)
    sim = simulator("--fail-rate", "0.35", "--seed", "4")
    workers(docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, max_attempts=1))
    handle = submit(corpus(8), "summarize", cache="off")
    assert handle.wait(timeout=60)["status"] == "partial"
    level = chunk_levels(handle.id)
    before = set(level)
    failed = {r.chunk_id for r in results(handle.id) if r.status == "error"}
    ok_before = {r.chunk_id: r.output for r in results(handle.id)
                 if r.status == "ok" and level[r.chunk_id] == 0}
    assert failed
    calls = sim.stats()["requests_total"]
    # When the failed chunks (and reduce steps) are retried
    assert retry(handle.id) == len(failed)
    final = handle.wait(timeout=60)
    # Then exactly the failed chunks were called again, the others kept, the reduce steps of
    # their documents made again from the new outputs, and the job merged again
    level = chunk_levels(handle.id)
    after = {r.chunk_id: r for r in results(handle.id)}
    rerun = [c for c in after if c in failed and level[c] == 0]
    new_steps = [c for c in after if c not in before]
    assert rerun and sim.stats()["requests_total"] == calls + sum(
        after[c].attempts for c in rerun + new_steps if not after[c].cached)
    assert {c: r.output for c, r in after.items() if c in ok_before} == ok_before
    assert final["status"] in ("succeeded", "partial")
    assert final["chunks_done"] == len(ok_before) + len(rerun) == final["chunks_total"]


def test_cancel_leaves_a_consistent_merged_job(simulator: Any, docq_env: Any,
                                               workers: Any) -> None:
    # Given a slow job of many batches
    sim = simulator("--latency-ms", "400", "--seed", "5")
    workers(docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, worker_inflight=2,
                     batch_max_chunks=4), concurrency=2)
    handle = submit(corpus(15), "summarize", cache="off")
    time.sleep(1.5)
    # When it is cancelled while running
    assert cancel(handle.id)
    final = handle.wait(timeout=60)
    calls_at_end = sim.stats()["requests_total"]
    # Then it is cancelled and merged, every chunk (and every reduce step of a document that
    # finished before the cancel) has exactly one final row
    rows = results(handle.id)
    states = Counter(r.status for r in rows)
    assert final["status"] == "cancelled"
    with runtime().sessions() as s:
        chunks = set(s.scalars(select(Chunk.id).where(Chunk.job_id == handle.id,
                                                      Chunk.level == 0)))
    assert len(rows) == len({r.chunk_id for r in rows})
    assert chunks <= {r.chunk_id for r in rows} and len(chunks) == final["chunks_total"]
    assert states["cancelled"] > 0 and set(states) <= {"ok", "cancelled"}
    assert sum(1 for r in rows if r.status == "ok" and not r.cached) == calls_at_end
    # and no model call happens afterwards
    time.sleep(1)
    assert sim.stats()["requests_total"] == calls_at_end
