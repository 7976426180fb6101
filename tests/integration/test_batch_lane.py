"""The batch lane end to end: `submit(..., lane="batch")`, a real worker and a real `docq beat`
against the simulator's Batch API, the ledger in PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from docqueue.models import (
    FINAL_JOB_STATES,
    Chunk,
    LedgerState,
    ProviderBatch,
    ProviderBatchChunk,
    Result,
)
from docqueue.tasks import submit
from docqueue.tasks.api import job_status
from docqueue.tasks.control import cancel
from docqueue.tasks.runtime import runtime

pytestmark = pytest.mark.integration

DOCQ = Path(sys.executable).parent / "docq"
# A price for the simulator's model, so that both lanes' costs are real numbers.
PRICES = json.dumps({"docq-sim": {"input_per_mtok": 2.0, "output_per_mtok": 8.0}})
SHAPE: dict[str, Any] = {"chunk_tokens": 40, "chunk_overlap_tokens": 0, "batch_max_chunks": 25,
                         "prices": PRICES, "batch_poll_s": 1}


class Beat:
    """`docq beat` as a child process, killed (not stopped) when asked to crash."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen([str(DOCQ), "beat"], env={**os.environ, **env},
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def beat(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Beat]]:
    started: list[Beat] = []

    def start(env: dict[str, str]) -> Beat:
        b = Beat(env, tmp_path / f"beat{len(started)}.log")
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def corpus(n: int, sentences: int = 2) -> list[tuple[str, str]]:
    """Documents whose every chunk is different text (so no answer comes from a cache)."""
    return [
        (f"doc-{i}", " ".join(f"Barge {i}-{j} unloaded {j + 3} crates at pier {i * 31 + j}."
                              for j in range(sentences)))
        for i in range(n)
    ]


def wait_final(job_id: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = job_status(job_id)
        if st["status"] in FINAL_JOB_STATES and st["finished_at"]:
            return st
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not final after {timeout_s:g}s: {job_status(job_id)}")


def batch_stats(sim: Any) -> dict[str, int]:
    return dict(httpx.get(sim.root_url + "/stats/batches", timeout=5).json())


def ledger(job_id: int) -> list[ProviderBatch]:
    with runtime().sessions() as s:
        rows = list(s.scalars(select(ProviderBatch).where(ProviderBatch.job_id == job_id)
                              .order_by(ProviderBatch.id)))
        s.expunge_all()
    return rows


def results(job_id: int) -> dict[int, tuple[str, int, int, float | None, Any]]:
    """chunk id -> (status, tokens in, tokens out, cost, output)."""
    with runtime().sessions() as s:
        return {r.chunk_id: (r.status, r.tokens_in, r.tokens_out, r.cost, r.output)
                for r in s.scalars(select(Result).where(Result.job_id == job_id))}


def by_text(job_id: int) -> dict[str, tuple[str, int, int, float | None, Any]]:
    with runtime().sessions() as s:
        rows = s.execute(select(Chunk.text, Result.status, Result.tokens_in, Result.tokens_out,
                                Result.cost, Result.output)
                         .join(Result, Result.chunk_id == Chunk.id)
                         .where(Chunk.job_id == job_id)).all()
    return {r[0]: tuple(r[1:]) for r in rows}  # type: ignore[misc]


def test_a_batch_lane_job_answers_like_the_online_lane_at_half_the_price(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given the simulator with a one-second turnaround, a worker and beat polling every second
    sim = simulator("--seed", "3", "--batch-turnaround-s", "1")
    env = docq_env(sim.url, **SHAPE)
    workers(env, concurrency=1)
    beat(env)
    docs = corpus(40)
    # When the same corpus goes through the batch lane and, with the cache off, online
    batch_job = submit(docs, "summarize", lane="batch")
    batch_st = wait_final(batch_job.id, 90)
    online_job = submit(docs, "summarize", cache="off")
    online_st = wait_final(online_job.id, 90)
    # Then both succeed with the same outputs and tokens, and the batch lane costs half
    assert batch_st["status"] == online_st["status"] == "succeeded"
    assert batch_st["lane"] == "batch"
    batch_rows, online_rows = by_text(batch_job.id), by_text(online_job.id)
    assert len(batch_rows) == batch_st["chunks_total"] == online_st["chunks_total"]
    for text, (status, tin, tout, _cost, output) in batch_rows.items():
        assert (status, tin, tout, output) == (online_rows[text][0], *online_rows[text][1:3],
                                               online_rows[text][4])
    assert online_st["cost"] > 0
    assert batch_st["cost"] == pytest.approx(online_st["cost"] / 2, rel=1e-9)
    print(f"\nfigures: chunks={batch_st['chunks_total']} online cost={online_st['cost']:.6f} "
          f"batch cost={batch_st['cost']:.6f}")
    # and the ledger holds one closed provider batch, which `docq status` shows
    rows = ledger(batch_job.id)
    assert [(r.state, r.provider_status) for r in rows] == [(LedgerState.CLOSED, "completed")]
    assert batch_st["provider_batches"][0]["completed"] == batch_st["chunks_total"]
    shown = subprocess.run([str(DOCQ), "status", str(batch_job.id)], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"provider batch {rows[0].provider_batch_id} completed" in shown
    # and a rerun of the unchanged corpus is answered from the cache: no file, no batch
    created = batch_stats(sim)
    rerun = submit(docs, "summarize", lane="batch")
    rerun_st = wait_final(rerun.id, 60)
    assert rerun_st["status"] == "succeeded"
    assert rerun_st["chunks_by_state"] == {"ok": batch_st["chunks_total"]}
    assert rerun_st["cost"] == 0
    assert ledger(rerun.id) == []
    assert batch_stats(sim) == created


def test_20000_chunks_go_in_files_within_limits_and_cost_half_the_online_price(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a provider that takes at most 6,000 requests a file
    sim = simulator("--seed", "4", "--batch-max-requests", "6000", "--batch-turnaround-s", "2")
    env = docq_env(sim.url, **SHAPE | {"batch_file_max_requests": 6000})
    workers(env, concurrency=1)
    beat(env)
    # When a job of 20,000 one-chunk documents goes through the batch lane
    started = time.monotonic()
    job = submit(corpus(20_000, sentences=1), "summarize", lane="batch", cache="off")
    st = wait_final(job.id, 600)
    took_s = time.monotonic() - started
    # Then it succeeds, every chunk once, in four files of at most 6,000 requests
    assert st["status"] == "succeeded", st
    assert st["chunks_total"] == 20_000
    assert st["chunks_by_state"] == {"ok": 20_000}
    rows = ledger(job.id)
    assert [r.requests for r in rows] == [6000, 6000, 6000, 2000]
    assert all(r.state == LedgerState.CLOSED and r.provider_status == "completed" for r in rows)
    assert batch_stats(sim)["batches_created"] == 4
    # and costs half of what the table's online price makes of the same tokens
    online = runtime().settings.price_for("docq-sim")
    assert online is not None
    online_cost = online.cost(st["tokens_in"], st["tokens_out"], "online")
    assert st["cost"] == pytest.approx(online_cost / 2, rel=1e-9)
    print(f"\nfigures: 20,000 chunks in {len(rows)} provider batches, submit to merged "
          f"{took_s:.1f} s; tokens in {st['tokens_in']:,} out {st['tokens_out']:,}; cost "
          f"batch ${st['cost']:.4f} vs online ${online_cost:.4f}")


def linked_chunks(row_id: int) -> set[int]:
    with runtime().sessions() as s:
        return set(s.scalars(select(ProviderBatchChunk.chunk_id)
                             .where(ProviderBatchChunk.provider_batch_id == row_id)))


def test_an_expired_batch_keeps_what_it_did_and_only_the_rest_is_sent_then_a_cancel_records_it(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a provider whose batches expire after 60% of their turnaround
    sim = simulator("--seed", "5", "--batch-turnaround-s", "10", "--batch-window-s", "6")
    env = docq_env(sim.url, **SHAPE)
    workers(env, concurrency=1)
    beat(env)
    job = submit(corpus(50), "summarize", lane="batch", cache="off")
    # When the first batch expires with 30 of its 50 lines done
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(ledger(job.id)) < 2:
        time.sleep(0.2)
    first, second = ledger(job.id)[:2]
    assert (first.provider_status, first.completed, first.requests) == ("expired", 30, 50)
    # Then the 30 are recorded once, and the next batch carries only the other 20
    done = {cid for cid, r in results(job.id).items() if r[0] == "ok"}
    assert len(done) == 30
    assert second.requests == 20
    assert linked_chunks(second.id) == linked_chunks(first.id) - done
    # When the job is cancelled while the second batch runs
    time.sleep(1.0)
    assert cancel(job.id)
    st = wait_final(job.id, 60)
    # Then that provider batch is cancelled, what it had completed is recorded, and the rest
    # ends cancelled
    rows = ledger(job.id)
    assert len(rows) == 2
    last = rows[-1]
    assert last.provider_status == "cancelled"
    assert 0 < last.completed < 20
    assert st["status"] == "cancelled"
    assert st["chunks_by_state"] == {"ok": 30 + last.completed, "cancelled": 20 - last.completed}
    assert batch_stats(sim)["batches_cancelled"] == 1
    print(f"\nfigures: expired batch kept {first.completed}/50; resent {second.requests}; "
          f"cancel kept {last.completed} of those")


class Crash(Exception):
    """The process dies here: nothing after this point of `advance` happens."""


class CrashingApi:
    """The real Batch API client, dying once right after the named call reached the provider."""

    def __init__(self, real: Any, after: str) -> None:
        self.real, self.after = real, after

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.real, name)
        if name != self.after:
            return call

        def once(*args: Any) -> Any:
            call(*args)
            self.after = ""
            raise Crash(f"died after {name}")

        return once


def provider_batches(sim: Any) -> list[dict[str, Any]]:
    return list(httpx.get(sim.url + "/batches", params={"limit": 100}, timeout=5)
                .json()["data"])


@pytest.mark.parametrize("after", ["upload", "create", "content"])
def test_a_crash_after_any_provider_call_is_finished_by_the_next_advance_without_a_duplicate(
    simulator: Any, docq_env: Any, after: str
) -> None:
    from docqueue.workers.jobs.lane import advance
    from docqueue.workers.provider.batch_api import OpenAIBatchApi, RequestBodies

    # Given a batch-lane job of 30 chunks and nothing polling it but this test
    sim = simulator("--seed", "6")
    docq_env(sim.url, **SHAPE)
    job = submit(corpus(30), "summarize", lane="batch", cache="off")
    rt = runtime()
    real = OpenAIBatchApi(rt.settings, sim.url)
    bodies = RequestBodies(rt.settings, sim.url)

    def step(api: Any) -> Any:
        return advance(rt.sessions, rt.settings, api, bodies, sim.url, job.id)

    # When the process dies right after the provider took the upload, the create, or gave
    # the output file (before anything after it was committed)
    if after == "content":  # sent, and polled until the next poll reads its files
        while not ledger(job.id) or ledger(job.id)[0].provider_status != "finalizing":
            step(real)
            time.sleep(0.2)
    with pytest.raises(Crash):
        step(CrashingApi(real, after))
    # Then the next advances finish the work: one provider batch, every chunk recorded once
    deadline = time.monotonic() + 30
    while not step(real).ready and time.monotonic() < deadline:
        time.sleep(0.3)
    real.close()
    assert len(provider_batches(sim)) == 1
    stats = batch_stats(sim)
    assert stats["batches_created"] == 1
    # (an upload whose id was lost with the process is made again: a file costs nothing)
    assert stats["files_uploaded"] == (2 if after == "upload" else 1)
    rows = results(job.id)
    with runtime().sessions() as s:
        chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job.id))
    assert len(rows) == chunks
    assert {r[0] for r in rows.values()} == {"ok"}
    assert [(r.state, r.requests) for r in ledger(job.id)] == [(LedgerState.CLOSED, chunks)]


@pytest.mark.parametrize("flush", [True, False], ids=["redis-flushed", "redis-kept"])
def test_killed_worker_and_beat_and_a_flushed_redis_lose_nothing_and_send_nothing_twice(
    simulator: Any, docq_env: Any, workers: Any, beat: Any, redis_client: redis.Redis,
    flush: bool
) -> None:
    # Given a job in three provider batches that take four seconds each
    sim = simulator("--seed", "7", "--batch-turnaround-s", "4", "--batch-max-requests", "100")
    env = docq_env(sim.url, **SHAPE | {"batch_file_max_requests": 100})
    w = workers(env, concurrency=1)
    b = beat(env)
    job = submit(corpus(300, sentences=1), "summarize", lane="batch", cache="off")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            r.state == LedgerState.CREATED for r in ledger(job.id)):
        time.sleep(0.1)
    # When the worker and beat are killed mid-poll (and Redis loses everything, or keeps the
    # dead worker's lane lock until it expires)
    w.kill()
    b.kill()
    if flush:
        redis_client.flushdb()
    before = [(r.state, r.provider_status) for r in ledger(job.id)]
    # and both come back
    workers(env, concurrency=1)
    beat(env)
    st = wait_final(job.id, 180)
    # Then the job succeeds with every chunk recorded once, and the provider got every
    # chunk in exactly one batch
    assert st["status"] == "succeeded", st
    assert st["chunks_by_state"] == {"ok": 300}
    sent = provider_batches(sim)
    assert len(sent) == len(ledger(job.id)) == 3
    assert sum(p["request_counts"]["total"] for p in sent) == 300
    stats = batch_stats(sim)
    assert stats["batches_created"] == 3
    print(f"\nfigures: ledger at the crash {before}; uploads {stats['files_uploaded']}, "
          f"batches created {stats['batches_created']}")


def attempts(job_id: int) -> list[int]:
    with runtime().sessions() as s:
        return list(s.scalars(select(Result.attempts).where(Result.job_id == job_id)))


def test_failed_lines_go_in_a_new_batch_until_they_pass(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a provider that fails a third of the lines it runs
    sim = simulator("--seed", "8", "--batch-fail-rate", "0.33")
    env = docq_env(sim.url, **SHAPE)
    workers(env, concurrency=1)
    beat(env)
    # When a batch-lane job runs
    job = submit(corpus(40), "summarize", lane="batch", cache="off")
    st = wait_final(job.id, 90)
    # Then every chunk ends ok, the failed ones in later batches that held only them
    assert st["status"] == "succeeded", st
    rows = ledger(job.id)
    assert len(rows) >= 2
    assert [r.requests for r in rows[1:]] == [r.failed for r in rows[:-1]]
    assert sum(attempts(job.id)) == sum(r.requests for r in rows)
    print(f"\nfigures: requests per provider batch {[r.requests for r in rows]}")


def test_the_few_chunks_a_batch_leaves_go_online_with_batch_fallback(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a provider that fails a fifth of the lines it runs, and a job that falls back to
    # the online lane for up to 20 chunks
    sim = simulator("--seed", "9", "--batch-fail-rate", "0.2")
    env = docq_env(sim.url, **SHAPE)
    workers(env, concurrency=1)
    beat(env)
    job = submit(corpus(40), "summarize", lane="batch", cache="off", batch_fallback="online",
                 fallback_below=20)
    st = wait_final(job.id, 90)
    # Then one provider batch ran, and its failed lines were called online, once each
    assert st["status"] == "succeeded", st
    (row,) = ledger(job.id)
    assert 0 < row.failed <= 20
    assert sim.stats()["by_status"] == {"200": row.failed}
    assert st["lane"] == "online"


def test_docq_resume_advances_a_batch_lane_job_and_merges_it(
    simulator: Any, docq_env: Any
) -> None:
    # Given a batch-lane job and no beat or worker running
    sim = simulator("--seed", "10")
    env = docq_env(sim.url, **SHAPE)
    job = submit(corpus(10), "summarize", lane="batch", cache="off")

    def resume() -> str:
        done = subprocess.run([str(DOCQ), "resume", str(job.id)], env={**os.environ, **env},
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # When `docq resume JOB` runs, it sends the provider batch
    assert f"job {job.id} (batch lane): 1 provider batches sent, 0 closed" in resume()
    # and when run again once the provider is done, it records the batch and merges the job
    second = resume()
    for _ in range(20):  # a poll may find it finalizing first
        if " 1 closed" in second:
            break
        time.sleep(0.5)
        second = resume()
    assert f"job {job.id} (batch lane): 0 provider batches sent, 1 closed, 10 results" in second
    assert "merged: succeeded" in second
    # Then the job is done, and a further resume finds nothing to do
    assert job_status(job.id)["status"] == "succeeded"
    assert "nothing to resume" in resume()
    assert batch_stats(sim)["batches_created"] == 1


def test_a_budget_counts_enqueued_batch_work_before_it_is_charged(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a batch-lane job whose dollar budget pays for ten chunks at max_tokens, and about
    # twenty-five at what they really take
    sim = simulator("--seed", "12", "--output-tokens-mean", "20", "--output-tokens-sd", "2")
    env = docq_env(sim.url, **SHAPE | {"llm_max_tokens": 64})
    workers(env, concurrency=1)
    beat(env)
    job = submit(corpus(30), "summarize", lane="batch", cache="off", budget_cost=0.003)
    st = wait_final(job.id, 90)
    # Then each provider batch held only what the budget left could pay for even at
    # max_tokens, the rest was skipped without being sent, and the spend is within budget
    rows = ledger(job.id)
    counts = st["chunks_by_state"]
    sent = sum(r.requests for r in rows)
    assert counts == {"ok": sent, "skipped_budget": 30 - sent}
    assert 0 < rows[0].requests < sent < 30
    assert st["cost"] <= 0.003
    assert st["status"] == "partial"
    row = rows[0]
    print(f"\nfigures: budget $0.003: {[r.requests for r in rows]} of 30 chunks sent, cost "
          f"${st['cost']:.6f}; first batch {row.requests}")


def test_files_wait_for_the_enqueued_token_limit_instead_of_failing_at_the_provider(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a provider that fails a batch past 3,000 enqueued prompt tokens, and docqueue told
    # the same limit
    sim = simulator("--seed", "13", "--batch-turnaround-s", "2", "--batch-enqueued-token-limit",
                    "3000")
    env = docq_env(sim.url, **SHAPE | {"batch_enqueued_token_limit": 3000})
    workers(env, concurrency=1)
    beat(env)
    # When a job of 180 chunks runs
    job = submit(corpus(180, sentences=1), "summarize", lane="batch", cache="off")
    st = wait_final(job.id, 120)
    # Then its files, each within the limit, went one at a time, and none failed at the provider
    assert st["status"] == "succeeded", st
    rows = ledger(job.id)
    assert len(rows) > 1
    assert sum(r.requests for r in rows) == 180
    assert {r.provider_status for r in rows} == {"completed"}
    assert all(r.tokens <= 3000 for r in rows)
    for earlier, later in itertools.pairwise(rows):
        assert earlier.closed_at is not None and later.created_at >= earlier.closed_at
    print(f"\nfigures: 180 chunks in files of {[r.requests for r in rows]} requests, "
          f"{[r.tokens for r in rows]} prompt tokens")


def test_a_batch_the_provider_fails_counts_an_attempt_for_each_chunk(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    # Given a provider whose enqueued-token limit no file of the job fits, and docqueue not
    # told of it
    sim = simulator("--seed", "14", "--batch-enqueued-token-limit", "100")
    env = docq_env(sim.url, **SHAPE | {"max_attempts": 2})
    workers(env, concurrency=1)
    beat(env)
    # When a batch-lane job runs
    job = submit(corpus(10), "summarize", lane="batch", cache="off")
    st = wait_final(job.id, 90)
    # Then each failed batch was an attempt, and after two the chunks end in error with the
    # provider's reason
    assert st["status"] == "failed", st
    rows = ledger(job.id)
    assert [r.provider_status for r in rows] == ["failed", "failed"]
    assert all(r.error and r.error.startswith("token_limit_exceeded: Enqueued token limit")
               for r in rows)
    with runtime().sessions() as s:
        errors = s.execute(select(Result.status, Result.attempts, Result.error_message)
                           .where(Result.job_id == job.id)).all()
    assert {(status, n) for status, n, _ in errors} == {("error", 2)}
    assert all("token_limit_exceeded" in message for _, _, message in errors)


def test_the_lane_lock_is_renewed_while_held_and_freed_after(
    docq_env: Any, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from docqueue.tasks import lane
    from docqueue.workers import keys

    docq_env("http://127.0.0.1:9/v1")
    monkeypatch.setattr(lane, "LOCK_TTL_S", 0.6)
    # While one advance holds a job's lock for longer than its TTL, no other takes it
    with lane._job_lock(7) as held:
        assert held
        for _ in range(4):
            time.sleep(0.4)
            with lane._job_lock(7) as other:
                assert not other
            assert redis_client.exists(keys.lane_lock(7))
    # and once it is done the lock is free at once
    assert not redis_client.exists(keys.lane_lock(7))
    with lane._job_lock(7) as again:
        assert again


def test_long_documents_go_through_the_batch_lane_and_are_reduced_online_to_one_answer(
    simulator: Any, docq_env: Any, workers: Any, beat: Any
) -> None:
    from docqueue.tasks.api import document_results

    # Given documents of several chunks each, on the batch lane
    sim = simulator("--seed", "4", "--batch-turnaround-s", "1")
    env = docq_env(sim.url, **SHAPE)
    workers(env, concurrency=1)
    beat(env)
    handle = submit(corpus(4, sentences=12), "summarize", lane="batch")
    # When the job ends
    st = wait_final(handle.id, 120)
    assert st["status"] == "succeeded", st
    with runtime().sessions() as s:
        levels = dict(s.execute(select(Chunk.level, func.count()).where(Chunk.job_id == handle.id)
                                .group_by(Chunk.level)).all())
    # Then every chunk went through the provider's batches and every reduce step online
    assert levels[0] > 4 and levels.get(1) == 4, levels
    sent = sum(r.requests for r in ledger(handle.id))
    assert sent == levels[0], (sent, levels)
    assert sim.stats()["requests_total"] == levels[1]
    # and each document has one answer, made from its chunks' summaries
    docs = list(document_results(handle.id))
    assert len(docs) == 4
    for doc in docs:
        assert doc["status"] == "ok" and isinstance(doc["output"]["summary"], str), doc
