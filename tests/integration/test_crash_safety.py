"""Crashes and outages mid-job, with real processes: nothing lost, nothing written twice.

Every test runs a job against the simulator with slow model calls, breaks something while
batches are in flight (a worker killed or stopped, Redis flushed, PostgreSQL restarted), and
checks what a user would: the job ends, every chunk has exactly one result row, and the model
was not called again for a chunk whose answer had been recorded. `calls - attempts` below is
the number of model calls whose answers were lost (paid for twice).

Most tests shrink the time limits so that Redis's visibility timeout (the redelivery of a
dead worker's messages) is seconds, not an hour; the settings validate their order. The
recovery tests keep the shipped time limits, heartbeat and lease: there a dead or frozen
worker's batch must go on through the heartbeats (workers/batch/liveness.py) within seconds,
with Redis's copy of its message an hour away. The simulator records every request, so the
calls per prompt, and when they started, are counted, not guessed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, or_, select
from sqlalchemy.exc import OperationalError

from docqueue.models import FINAL_JOB_STATES as TERMINAL
from docqueue.models import FINAL_RESULT_STATES, Batch, Chunk, Document, Job, Result, upgrade
from docqueue.tasks import submit
from docqueue.tasks.runtime import runtime
from docqueue.workers import keys
from docqueue.workers.jobs.reconcile import open_jobs
from docqueue.workers.pipelines import build_pipeline
from tests.conftest import free_port

pytestmark = pytest.mark.integration

# model timeout < soft limit < hard limit < lease < visibility timeout; a batch's budget is
# soft - timeout - 15 = 5 s, plenty for a batch of 4 concurrent calls of up to 1.5 s.
FAST: dict[str, Any] = {
    "llm_timeout_s": 2, "task_soft_time_limit_s": 22, "task_time_limit_s": 23, "lease_s": 24,
    "visibility_timeout_s": 26, "retry_backoff_max_s": 5,
    "chunk_tokens": 40, "chunk_overlap_tokens": 0, "batch_max_chunks": 4,
}
# The recovery tests: small batches of short chunks, everything else as shipped.
SHAPE: dict[str, Any] = {"chunk_tokens": 40, "chunk_overlap_tokens": 0, "batch_max_chunks": 4}
RECOVERY_BOUND_S = 30.0  # the promise: a dead worker's batch is called again by then
DOCQ = Path(sys.executable).parent / "docq"


def corpus(n: int, sentences: int = 6) -> list[tuple[str, str]]:
    """Documents whose every chunk is different text (so no answer comes from a cache)."""
    return [
        (f"doc-{i}", " ".join(f"Boat {i}-{j} came back to quay {i * 97 + j} at noon with its "
                              f"catch of {j + 3} crates." for j in range(sentences)))
        for i in range(n)
    ]


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def tally(job_id: int) -> dict[str, Any]:
    """What the store holds for the job: chunks, result rows, attempts, status."""
    with runtime().sessions() as s:
        chunks = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job_id))
        rows = s.execute(select(Result.chunk_id, Result.status, Result.attempts)
                         .where(Result.job_id == job_id)).all()
        status = s.scalar(select(Job.status).where(Job.id == job_id))
    return {
        "chunks": chunks, "rows": len(rows), "distinct": len({r.chunk_id for r in rows}),
        "ok": sum(1 for r in rows if r.status == "ok"), "attempts": sum(r.attempts for r in rows),
        "states": {r.status for r in rows}, "status": status,
    }


def in_progress(job_id: int) -> int:
    """Chunks without a final result that a live delivery holds a lease on."""
    with runtime().sessions() as s:
        return sum(b.leased for j in open_jobs(s, [job_id]) for b in j.batches)


def finished(job_id: int) -> bool:
    try:
        return tally(job_id)["status"] in TERMINAL
    except OperationalError:  # the store is restarting: not finished, ask again
        return False


def model_calls(sim: Any) -> int:
    """Requests the provider received: answered, plus those whose client went away."""
    st = sim.stats()
    return int(st["requests_total"]) + int(st["cancelled"])


def assert_exactly_once(job_id: int, sim: Any, max_lost_calls: int = 0) -> None:
    t = tally(job_id)
    assert t["status"] == "succeeded", t
    assert t["rows"] == t["distinct"] == t["chunks"] == t["ok"], t
    calls = model_calls(sim)
    # Every recorded attempt is a call; a call beyond them is an answer that was lost.
    assert t["attempts"] <= calls <= t["attempts"] + max_lost_calls, (calls, t)
    print(f"\nfigures: chunks={t['chunks']} rows={t['rows']} attempts={t['attempts']} "
          f"calls={calls} lost_calls={calls - t['attempts']}")


def leased_by(pids: list[int], job_id: int) -> dict[int, str]:
    """Chunks without a final result under a lease of a delivery in one of `pids`: id -> text.
    (A lease owner is "<pid>:<delivery>", tasks/batches.py.)"""
    with runtime().sessions() as s:
        final = select(Result.chunk_id).where(Result.job_id == job_id,
                                              Result.status.in_(FINAL_RESULT_STATES))
        rows = s.execute(select(Chunk.id, Chunk.text).where(
            Chunk.job_id == job_id, Chunk.id.not_in(final),
            or_(*[Chunk.lease_owner.like(f"{pid}:%") for pid in pids]))).all()
    return {r.id: r.text for r in rows}


def prompt_of(text: str) -> str:
    """What the simulator records as a chunk's prompt: the user message summarize sends."""
    messages = build_pipeline("summarize", {}).render(text, "chat").messages
    assert messages is not None
    return messages[-1]["content"]


def first_call_after(requests: list[dict[str, Any]], t: float) -> dict[str, float]:
    """Per prompt, the start of its first call at or after `t` (epoch seconds)."""
    first: dict[str, float] = {}
    for r in requests:
        if r["start"] >= t and r["prompt"] is not None:
            first[r["prompt"]] = min(first.get(r["prompt"], r["start"]), r["start"])
    return first


def batches_sent_again(*logs: str) -> list[int]:
    """The batch ids of every rescue the workers logged ("sent N batches again at once: ...")."""
    ids: list[int] = []
    for log in logs:
        for line in log.splitlines():
            if "batches again at once" in line:
                ids += [int(b) for b in line.rsplit(": ", 1)[1].split(", ")]
    return ids


def test_a_killed_workers_batch_is_called_again_by_another_worker_within_30s(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given two workers with the shipped time limits, heartbeat and lease (Redis would give a
    # dead worker's messages back after an hour), on a job of slow calls
    sim = simulator("--latency-ms", "1500", "--seed", "21", "--record-requests")
    env = docq_env(sim.url, **SHAPE)
    w0, w1 = workers(env, concurrency=2), workers(env, concurrency=2)
    handle = submit(corpus(24), "summarize")
    pids = w0.children()
    wait_until(lambda: bool(leased_by(pids, handle.id)) and sim.stats()["in_flight"] > 0, 60,
               "w0 in the middle of a batch")
    # When w0 and its pool processes are SIGKILLed mid-batch
    w0.kill()
    killed = time.time()
    orphans = leased_by(pids, handle.id)  # what the dead deliveries held and did not finish
    assert orphans, "w0 finished its batches before the kill"
    # Then the job completes with one final row per chunk, and the calls made twice are no more
    # than those in flight at the kill (or answered in its last half second, not yet written)
    wait_until(lambda: finished(handle.id), 180, "the job to end")
    requests = sim.requests()
    in_flight = sum(1 for r in requests if r["start"] < killed and r["end"] > killed - 0.5)
    assert_exactly_once(handle.id, sim, max_lost_calls=in_flight)
    # and every chunk the dead worker held was called again, by w1, within 30 s of the kill
    again = first_call_after(requests, killed)
    delays = sorted(again[prompt_of(text)] - killed for text in orphans.values())
    assert len(delays) == len(orphans)
    assert delays[-1] <= RECOVERY_BOUND_S, delays
    # each of its batches sent again once (found dead as a delivery and as a message its worker
    # received: one rescue)
    resent = batches_sent_again(w1.log())
    assert resent and len(resent) == len(set(resent)), resent
    print(f"\nfigures: {len(orphans)} chunks held at the kill, called again after "
          f"{delays[0]:.1f}-{delays[-1]:.1f} s; {in_flight} calls in flight at the kill")


def tasks_logged(log: str, event: str) -> set[str]:
    """The ids of the batch tasks a worker's log says were `received`, `succeeded` or `retry`."""
    return set(re.findall(rf"batches\.process\[([0-9a-f-]+)\] {event}", log))


def test_on_rabbitmq_a_killed_workers_messages_are_redelivered_and_the_job_completes_once(
    simulator: Any, docq_env: Any, workers: Any, rabbitmq_url: str, redis_url: str
) -> None:
    # Given two workers whose tasks travel on RabbitMQ (a virtual host of the test's own), with
    # docqueue's state in Redis and the shipped time limits, heartbeat and lease, on a job of
    # slow calls
    sim = simulator("--latency-ms", "1500", "--seed", "23", "--record-requests")
    env = docq_env(sim.url, broker_url=rabbitmq_url, redis_url=redis_url, **SHAPE)
    w0, w1 = workers(env, concurrency=2), workers(env, concurrency=2)
    handle = submit(corpus(24), "summarize")
    pids = w0.children()
    wait_until(lambda: bool(leased_by(pids, handle.id)) and sim.stats()["in_flight"] > 0, 60,
               "w0 in the middle of a batch")
    # When w0 and its pool processes are SIGKILLed mid-batch
    w0.kill()
    killed, killed_mono = time.time(), time.monotonic()
    orphans = leased_by(pids, handle.id)
    assert orphans, "w0 finished its batches before the kill"
    log0 = w0.log()
    unfinished = (tasks_logged(log0, "received") - tasks_logged(log0, "succeeded")
                  - tasks_logged(log0, "retry"))
    assert unfinished
    # Then RabbitMQ gives the messages w0 held unacknowledged (acks_late) to w1 at once, before
    # the heartbeats' TTL could send their batches again
    wait_until(lambda: bool(unfinished & tasks_logged(w1.log(), "received")), 8,
               "w1 to receive a message w0 held")
    assert time.monotonic() - killed_mono < runtime().settings.heartbeat_ttl_s
    redelivered = unfinished & tasks_logged(w1.log(), "received")
    # and the job completes with one final row per chunk; the calls made twice are no more than
    # those in flight at the kill (or answered in its last half second, not yet written)
    wait_until(lambda: finished(handle.id), 180, "the job to end")
    requests = sim.requests()
    in_flight = sum(1 for r in requests if r["start"] < killed and r["end"] > killed - 0.5)
    assert_exactly_once(handle.id, sim, max_lost_calls=in_flight)
    # and every chunk the dead worker held was called again, by w1, within 30 s of the kill
    again = first_call_after(requests, killed)
    delays = sorted(again[prompt_of(text)] - killed for text in orphans.values())
    assert len(delays) == len(orphans) and delays[-1] <= RECOVERY_BOUND_S, delays
    print(f"\nfigures: {len(redelivered)} of the {len(unfinished)} messages w0 held "
          f"redelivered; {len(orphans)} chunks held at the kill, called again after "
          f"{delays[0]:.1f}-{delays[-1]:.1f} s; {in_flight} calls in flight at the kill")


def spend_and_rows(job_id: int) -> dict[str, Any]:
    """Everything a frozen worker must not change: each result row as stored, the job's spend
    in the store, and its spend counters in Redis."""
    with runtime().sessions() as s:
        rows = s.execute(select(Result.chunk_id, Result.status, Result.attempts, Result.output,
                                Result.tokens_in, Result.tokens_out, Result.cost,
                                Result.updated_at)
                         .where(Result.job_id == job_id).order_by(Result.chunk_id)).all()
        spend = s.execute(select(func.sum(Result.tokens_in + Result.tokens_out),
                                 func.sum(Result.cost)).where(Result.job_id == job_id)).one()
        job = s.execute(select(Job.tokens_in, Job.tokens_out, Job.cost)
                        .where(Job.id == job_id)).one()
    client = redis.Redis.from_url(runtime().settings.state_redis_url or "")
    counters = [client.get(k) for k in keys.job_spend(job_id)]
    client.close()
    return {"rows": [tuple(r) for r in rows], "spend": tuple(spend), "job": tuple(job),
            "counters": counters}


def test_a_worker_frozen_for_60s_changes_no_final_row_and_no_spend_total_when_it_resumes(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given two workers of one pool process each, with the shipped time limits, heartbeat and
    # lease, on a job of slow calls with a token budget (so its spend is counted in Redis too)
    sim = simulator("--latency-ms", "3000", "--seed", "22", "--record-requests")
    env = docq_env(sim.url, **SHAPE)
    w0, w1 = workers(env, concurrency=1), workers(env, concurrency=1)
    handle = submit(corpus(12), "summarize", budget_tokens=10**8)
    pids = w0.children()
    wait_until(lambda: bool(leased_by(pids, handle.id)) and sim.stats()["in_flight"] > 0, 60,
               "w0 in the middle of a batch")
    # When w0 is frozen (SIGSTOP to it and its pool process) for 60 s, calls in flight
    w0.pause()
    frozen, frozen_at = time.monotonic(), time.time()
    try:
        held = leased_by(pids, handle.id)
        assert held, "w0 finished its batch before the freeze"
        # Then w1 finishes the job, the frozen worker's batch included
        wait_until(lambda: finished(handle.id), 120, "w1 to finish the job")
        before = spend_and_rows(handle.id)
        assert tally(handle.id)["status"] == "succeeded"
        # having called the held chunks again within 30 s of the freeze (a transaction the
        # freeze left open, with its row locks, does not hold that up: the store ends it), and
        # sent each of w0's batches again once
        again = first_call_after(sim.requests(), frozen_at)
        delays = sorted(again[prompt_of(text)] - frozen_at for text in held.values())
        assert len(delays) == len(held) and delays[-1] <= RECOVERY_BOUND_S, delays
        resent = batches_sent_again(w1.log())
        assert resent and len(resent) == len(set(resent)), resent
        time.sleep(max(0.0, 60 - (time.monotonic() - frozen)))
    finally:
        w0.resume()
    # and once w0 runs again (its calls' answers come in, it finds its heartbeat lapsed and
    # its chunks taken over), what it tried to write was refused by its lost leases
    wait_until(lambda: "results not recorded" in w0.log(), 60, "w0's fenced write")
    wait_until(lambda: sim.stats()["in_flight"] == 0, 60, "no call in flight")
    time.sleep(5)  # its own message comes back (LAPSED_RETRY_S) and finds the batch done
    # Then no result row, no spend total in the store and no spend counter in Redis changed
    after = spend_and_rows(handle.id)
    assert after == before
    t = tally(handle.id)
    assert t["rows"] == t["distinct"] == t["chunks"] == t["ok"], t
    print(f"\nfigures: {len(held)} chunks held at the freeze, called again after "
          f"{delays[0]:.1f}-{delays[-1]:.1f} s; frozen {time.monotonic() - frozen:.0f} s; "
          f"spend {before['spend']}; counters {before['counters']}")


def test_a_worker_killed_mid_batch_is_redelivered_and_the_job_completes_once(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a job of 30 batches of slow calls, and a worker in the middle of it
    sim = simulator("--latency-ms", "500", "--seed", "11", "--record-requests")
    env = docq_env(sim.url, **FAST)
    w0 = workers(env, concurrency=2)
    handle = submit(corpus(20), "summarize")
    wait_until(lambda: tally(handle.id)["rows"] >= 4 and in_progress(handle.id) > 0, 30,
               "results, and a batch in progress")
    # When the worker and its pool processes are killed with SIGKILL, mid-batch
    w0.kill()
    killed, killed_at = time.monotonic(), time.time()
    at_kill = tally(handle.id)
    assert at_kill["rows"] < at_kill["chunks"], "the job ended before the kill"
    # and a new worker starts once the visibility timeout has passed (kombu puts the dead
    # worker's unacknowledged messages back when a consumer starts, then every ~100 s; the new
    # worker's rescuer sends the dead deliveries' batches too: the second copy is absorbed)
    time.sleep(max(0.0, FAST["visibility_timeout_s"] + 1 - (time.monotonic() - killed)))
    workers(env, concurrency=2)
    # Then the job completes with one result per chunk; only the calls in flight at the kill
    # (or answered in its last half second, not yet written) were made twice.
    # The bound, from the new worker's readiness: its rescuer sends the dead deliveries' and
    # reservations' batches at its first tick (at once) and kombu restores the unacknowledged
    # messages at its first poll; what is left is at most 30 batches of 4 calls of 0.5 s, run
    # side by side (2 processes x 64 batches), then each document's one or two reduce levels of
    # 0.5 s calls, and the last reduce batch merges the job: a few seconds idle, 10 s measured
    # beside other test runs (load average 12 on two cores). A job that stays running has lost a
    # message, as a reduce level made just before the kill and never sent once did (fixed in
    # workers/jobs/merging.py `never_started`); more time would not have ended it.
    wait_until(lambda: finished(handle.id), 60, "the job to end")
    in_flight = sum(1 for r in sim.requests()
                    if r["start"] < killed_at and r["end"] > killed_at - 0.5)
    assert_exactly_once(handle.id, sim, max_lost_calls=in_flight)


def test_redis_flushed_mid_job_is_finished_by_the_reconciler(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis
) -> None:
    from docqueue.tasks.maintenance import reconcile
    from docqueue.workers.jobs.reconcile import marker_key

    # Given a job in flight, with its publish marker in Redis, and more batches than the
    # worker has open (2 per process), so some wait in the queue
    sim = simulator("--latency-ms", "500", "--seed", "12")
    env = docq_env(sim.url, worker_batches=2, **FAST)
    workers(env, concurrency=2)
    handle = submit(corpus(20), "summarize")
    assert redis_client.exists(marker_key(handle.id))
    wait_until(lambda: tally(handle.id)["rows"] >= 4, 30, "the first results")
    # When Redis loses everything: queued and unacknowledged messages, chord state, marker
    redis_client.flushdb()
    assert not finished(handle.id)
    # and the reconciler runs, as beat runs it (here every two seconds instead of every minute)
    runs = []
    while not finished(handle.id) and len(runs) < 30:
        runs.append(reconcile())
        time.sleep(2)
    # Then its first run sent the lost batches again, and the job completed exactly once
    first = {r["job_id"]: r for r in runs[0]}[handle.id]
    assert first["resent"] > 0, runs[0]
    assert "no publish marker" in first["reason"]
    print(f"\nfigures: first run {first}; {len(runs)} runs until the job ended")
    assert_exactly_once(handle.id, sim, max_lost_calls=0)
    # and a further run finds nothing to do
    assert reconcile() == []
    assert not redis_client.exists(marker_key(handle.id))


def test_a_batch_message_lost_while_the_marker_survived_is_sent_again_once_the_queue_runs_dry(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis
) -> None:
    from docqueue.tasks.maintenance import reconcile
    from docqueue.workers.jobs.reconcile import marker_key

    # Given a job submitted while no worker ran, whose publish marker is in Redis but one of
    # whose batch messages is gone (a Redis crash between two fsyncs of its append-only file
    # keeps one write and loses the other); the reconciler's settle time is 2 s
    sim = simulator("--latency-ms", "200", "--seed", "14")
    env = docq_env(sim.url, reconcile_every_s=2, **FAST)
    handle = submit(corpus(12), "summarize")
    assert redis_client.exists(marker_key(handle.id))
    queued = redis_client.lrange("celery", 0, -1)
    lost = next(m for m in queued if re.search(rb"batch=2[ /]", m))
    assert redis_client.lrem("celery", 1, lost) == 1
    # When the reconciler runs with the rest still queued, it leaves the job to Redis
    first = {r["job_id"]: r for r in reconcile()}[handle.id]
    assert first["resent"] == 0, first
    # then a worker starts and the reconciler runs every 2 s, as beat would
    workers(env, concurrency=2)
    runs = []
    while not finished(handle.id) and len(runs) < 60:
        runs.append({r["job_id"]: r for r in reconcile()}.get(handle.id))
        time.sleep(1)
    # Then once the queue ran dry the lost batch was sent again, once, and the job completed
    # with every chunk called once
    resends = [r for r in runs if r and r["resent"]]
    print(f"\nfigures: {len(runs)} reconciler runs until the job ended; resends {resends}")
    assert [r["resent"] for r in resends] == [1], runs
    assert "lost their delivery" in resends[0]["reason"]
    assert_exactly_once(handle.id, sim, max_lost_calls=0)
    assert tally(handle.id)["status"] == "succeeded"


def test_a_worker_restarted_under_its_name_sends_again_what_its_former_self_had_received(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from docqueue.workers import keys

    # Given a job submitted while no worker ran, one of whose batch messages a worker named
    # w0 had received (its reservation is recorded) when it was killed: the message is gone
    # from the queue, and only the reservation says where it went
    sim = simulator("--latency-ms", "100", "--seed", "15")
    env = docq_env(sim.url, **FAST)
    handle = submit(corpus(8), "summarize")
    received = next(m for m in redis_client.lrange("celery", 0, -1)
                    if re.search(rb"batch=1[ /]", m))
    assert redis_client.lrem("celery", 1, received) == 1
    with runtime().sessions() as s:
        batch_id = s.scalar(select(Batch.id).where(Batch.job_id == handle.id, Batch.seq == 1))
    hostname = f"w00@{socket.gethostname()}"  # `docq worker --name=w0`'s first process
    redis_client.hset(keys.RESERVED, "former-w0-task:0", f"{batch_id} {hostname}")
    # When the worker starts again under the same names (its heartbeat vouches for them)
    worker = workers(env, concurrency=2)
    # Then it sends that batch again as it starts, with no reconciler, and the job completes
    # with every chunk called once
    wait_until(lambda: finished(handle.id), 60, "the job to end")
    assert_exactly_once(handle.id, sim, max_lost_calls=0)
    assert not redis_client.hexists(keys.RESERVED, "former-w0-task:0")
    log = worker.log()
    assert "had received them before this start" in log, log[-2000:]


def test_docq_resume_sends_a_job_whose_messages_were_lost_and_is_idempotent(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis
) -> None:
    # Given a job submitted while no worker ran, whose messages then vanished with Redis
    sim = simulator("--seed", "13")
    env = docq_env(sim.url, **FAST)
    handle = submit(corpus(4), "summarize")
    redis_client.flushdb()
    # When `docq resume JOB` runs twice, and only then a worker starts
    first = _docq(env, "resume", str(handle.id))
    second = _docq(env, "resume", str(handle.id))
    with runtime().sessions() as s:  # counted before a worker adds the reduce steps' batches
        batches = s.scalar(select(func.count()).select_from(Batch)
                           .where(Batch.job_id == handle.id))
    workers(env, concurrency=2)
    # Then the first run sent every batch again; the second found them queued (none is
    # leased, so it sends them again, and the duplicates cost no model call)
    assert f"sent {batches} batches again" in first.stdout, first
    assert second.returncode == 0, second
    wait_until(lambda: finished(handle.id), 60, "the job to end")
    assert_exactly_once(handle.id, sim, max_lost_calls=0)
    # and on a finished job, and on an unknown one, it says so
    done = _docq(env, "resume", str(handle.id))
    assert done.returncode == 0 and "nothing to resume" in done.stdout
    unknown = _docq(env, "resume", "999999")
    assert unknown.returncode == 2 and "job 999999 does not exist" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def _docq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DOCQ), *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60, check=False)


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port, so stopping it disturbs nobody else."""

    def __init__(self) -> None:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                check=True).stdout.strip()
        self.pg_ctl = Path(bindir) / "pg_ctl"
        if not (Path(bindir) / "initdb").exists():
            pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="docq-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.as_owner: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self._run(str(Path(bindir) / "initdb"), "-D", str(self.dir / "data"), "--auth=trust",
                  "-U", "postgres", "-E", "UTF8")
        self.start()

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_owner, *argv], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.pg_ctl), "-D", str(self.dir / "data"), "-o", opts,
                  "-l", str(self.dir / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.pg_ctl), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[PrivatePostgres]:
    if shutil.which("pg_config") is None:
        pytest.skip("pg_config is not installed: cannot start a private PostgreSQL")
    pg = PrivatePostgres()
    try:
        upgrade(pg.url)
        yield pg
    finally:
        pg.remove()


def test_postgres_restarted_mid_job_loses_no_paid_output(
    simulator: Any, docq_env: Any, workers: Any, own_postgres: PrivatePostgres
) -> None:
    # Given a job in flight whose results store is a PostgreSQL of its own
    sim = simulator("--latency-ms", "500", "--seed", "14")
    env = docq_env(sim.url, database_url=own_postgres.url, **FAST)
    w0 = workers(env, concurrency=2)
    handle = submit(corpus(20), "summarize")
    wait_until(lambda: tally(handle.id)["rows"] >= 4, 30, "the first results")
    # When PostgreSQL stops (fast: every connection is cut) for three seconds, then starts
    own_postgres.stop("fast")
    try:
        time.sleep(3)
    finally:
        own_postgres.start()
    # Then the job completes with one row per chunk and no model call made twice: the answers
    # that came back while the store was down were kept and written once it was up
    wait_until(lambda: finished(handle.id), 90, "the job to end")
    assert_exactly_once(handle.id, sim, max_lost_calls=0)
    assert "results store unavailable" in w0.log() or "OperationalError" in w0.log()


def test_the_same_batch_delivered_to_two_worker_processes_calls_the_model_once_per_chunk(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    from docqueue.tasks.batches import process_batch
    from docqueue.workers.ingest.sources import iter_documents
    from docqueue.workers.jobs.submission import create_job, ingest, mark_submitted
    from docqueue.workers.pipelines import build_pipeline

    # Given two separate worker processes and a recorded, unpublished job with slow calls
    sim = simulator("--latency-ms", "500", "--seed", "15")
    env = docq_env(sim.url, **{**FAST, "batch_max_chunks": 8})
    w0, w1 = workers(env, concurrency=1), workers(env, concurrency=1)
    rt = runtime()
    with rt.sessions.begin() as s:
        job_id = create_job(s, rt.settings, build_pipeline("summarize", {})).id
    ingest(rt.sessions, rt.settings, job_id, iter_documents(corpus(2), max_bytes=10**6))
    with rt.sessions.begin() as s:
        mark_submitted(s, job_id)
        batch_id, size = s.execute(select(Batch.id, Batch.chunk_count)
                                   .where(Batch.job_id == job_id, Batch.seq == 1)).one()
    # When one message is delivered twice at once, one copy to each worker
    task_id = str(uuid.uuid4())
    copies = [process_batch.apply_async((batch_id,), task_id=task_id) for _ in range(2)]
    for copy in copies:
        copy.get(timeout=60)
    # Then both workers took a copy, yet each chunk was sent to the model once, with one row
    assert task_id in w0.log() and task_id in w1.log()
    with rt.sessions() as s:
        rows = s.execute(select(Result.chunk_id, Result.attempts)
                         .where(Result.job_id == job_id)).all()
    assert len(rows) == len({r.chunk_id for r in rows}) == size
    assert all(r.attempts == 1 for r in rows)
    assert model_calls(sim) == size


def lease_holders(job_id: int, chunk_ids: list[int] | None = None) -> list[tuple[int, bool]]:
    """The pool process (pid) holding each unfinished chunk of the job (or of `chunk_ids`) under
    a lease, and whether the chunk is leased alone. (A lease owner is "<pid>:<delivery>".)"""
    with runtime().sessions() as s:
        final = select(Result.chunk_id).where(Result.job_id == job_id,
                                              Result.status.in_(FINAL_RESULT_STATES))
        query = select(Chunk.lease_owner, Chunk.leased_alone).where(
            Chunk.job_id == job_id, Chunk.id.not_in(final), Chunk.lease_owner.is_not(None))
        if chunk_ids is not None:
            query = query.where(Chunk.id.in_(chunk_ids))
        rows = s.execute(query).all()
    return [(int(r.lease_owner.split(":", 1)[0]), r.leased_alone) for r in rows]


def test_a_chunk_that_kills_its_worker_every_time_is_failed_alone_and_its_batch_finishes(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given one pool process working one batch at a time (so a chunk held alone is the only one
    # in flight in its process), a poison guard of 3 deaths, and a job of several batches in
    # which one short document is poison: its process dies whenever its chunk is handled
    sim = simulator("--latency-ms", "2000", "--seed", "31")
    env = docq_env(sim.url, max_deliveries=3, worker_batches=1, **SHAPE)
    w0 = workers(env, concurrency=1)
    docs = corpus(3)
    docs.insert(1, ("poison", "A short note about the poison crate."))
    handle = submit(docs, "summarize")
    with runtime().sessions() as s:
        poison_id, batch_seq = s.execute(
            select(Chunk.id, Chunk.batch_seq).join(Document, Document.id == Chunk.document_id)
            .where(Chunk.job_id == handle.id, Document.external_id == "poison")).one()
        batches = s.scalar(select(func.count()).select_from(Batch)
                           .where(Batch.job_id == handle.id))
        mates = s.scalar(select(func.count()).select_from(Chunk).where(
            Chunk.job_id == handle.id, Chunk.batch_seq == batch_seq)) - 1
    assert batches >= 3 and mates >= 1, (batches, mates)

    # When every pool process that takes the poison chunk is SIGKILLed at once (its calls take
    # 2 s: the kill lands before an answer)
    killed: list[int] = []

    def kill_its_holder() -> bool:
        for pid, _ in lease_holders(handle.id, [poison_id]):
            if pid not in killed and pid in w0.children():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return finished(handle.id)

    # The bound: three deaths, each found after the heartbeat's TTL (10 s) and the rescuer's
    # tick (2 s), plus about 30 calls of 2 s one batch at a time: about 100 s; 300 s on a
    # loaded machine. A job left running longer has lost the poison chunk's batch.
    wait_until(kill_its_holder, 300, "the job to end", poll_s=0.05)
    # Then the poison chunk alone is failed, after the worker died 3 times with it (twice with
    # its batch, then with the chunk alone), naming the chunk; every other chunk, its batch
    # mates too, is ok
    assert len(killed) == 3, killed
    t = tally(handle.id)
    assert t["status"] == "partial" and t["rows"] == t["chunks"], t
    with runtime().sessions() as s:
        failed = s.execute(select(Result.chunk_id, Result.error_type, Result.error_message,
                                  Result.document_id)
                           .where(Result.job_id == handle.id, Result.status != "ok")).all()
    assert [(f.chunk_id, f.error_type) for f in failed] == [(poison_id, "PoisonChunk")], failed
    assert failed[0].error_message.startswith(
        f"document {failed[0].document_id} chunk 0: the worker handling it died 3 times "
        f"(1 with this chunk alone in flight"), failed[0].error_message
    # and says how the three processes died, as `docq worker` saw it
    assert failed[0].error_message.count("ended with SIGKILL") == 3, failed[0].error_message
    print(f"\nfigures: chunks={t['chunks']} batches={batches} kills={len(killed)} "
          f"calls={model_calls(sim)}; error: {failed[0].error_message}")


def test_a_worker_killed_again_and_again_mid_batch_fails_no_chunk(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given two workers, each process working one batch at a time, the tightest poison guard
    # (2 deaths), and a job of about 30 batches of slow calls
    sim = simulator("--latency-ms", "1500", "--seed", "32")
    env = docq_env(sim.url, max_deliveries=2, worker_batches=1, **SHAPE)
    w0, _ = workers(env, concurrency=2), workers(env, concurrency=2)
    handle = submit(corpus(30), "summarize")

    # When w0's pool processes are SIGKILLed, one at a time, whenever one is in the middle of
    # a batch (never while it holds a chunk alone: such a death is a suspect's and counts),
    # up to 6 times, 2 s apart so its pool is back in between
    killed: list[int] = []
    last = 0.0

    def kill_mid_batch() -> bool:
        nonlocal last
        if len(killed) < 6 and time.monotonic() - last > 2:
            held: dict[int, list[bool]] = {}
            for pid, alone in lease_holders(handle.id):
                held.setdefault(pid, []).append(alone)
            for pid in w0.children():
                if len(held.get(pid, [])) >= 2 and not any(held[pid]) and pid not in killed:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    last = time.monotonic()
                    break
        return finished(handle.id)

    # The bound: each kill delays its batch by the heartbeat's TTL and the rescuer's tick
    # (12 s), 6 at most, on top of ~30 batches of 1.5 s calls over 4 processes (~15 s): about
    # 90 s; 300 s on a loaded machine.
    wait_until(kill_mid_batch, 300, "the job to end", poll_s=0.05)
    # Then the job succeeds with every chunk ok, though chunks were in flight in one or two
    # deaths (from two on, a chunk is retried alone: w0 is not killed then)
    assert len(killed) >= 2, f"only {len(killed)} kills: the job ended first"
    t = tally(handle.id)
    assert t["status"] == "succeeded" and t["rows"] == t["distinct"] == t["chunks"] == t["ok"], t
    with runtime().sessions() as s:
        deaths = list(s.scalars(select(Chunk.deaths).where(Chunk.job_id == handle.id)))
    assert sum(deaths) >= len(killed)  # every kill hit chunks in flight
    marked = sum(1 for d in deaths if d)
    print(f"\nfigures: chunks={t['chunks']} kills={len(killed)} chunks marked={marked} "
          f"max deaths of a chunk={max(deaths)}")


def test_sigterm_lets_running_batches_finish_and_another_worker_takes_the_rest(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    from docqueue.tasks.maintenance import worker_memory

    # Given a worker in the middle of a job of slow calls, reporting its memory
    sim = simulator("--latency-ms", "1000", "--seed", "17")
    env = docq_env(sim.url, **FAST)
    w0 = workers(env, concurrency=2)
    wait_until(lambda: len(worker_memory(runtime().settings)) == 2, 20, "memory reports")
    memory = worker_memory(runtime().settings)
    assert {r["role"] for r in memory} == {"main"}  # two processes, each running its batches
    assert all(r["rss_mb"] > 10 and r["limit_mb"] == 1024 for r in memory), memory
    handle = submit(corpus(8), "summarize")
    wait_until(lambda: in_progress(handle.id) > 0, 30, "a batch in progress")
    # When it gets SIGTERM (what `docker stop` and systemd send)
    stopped = time.monotonic()
    w0.proc.send_signal(signal.SIGTERM)
    w0.proc.wait(30)
    exit_s = time.monotonic() - stopped
    print(f"\nfigures: worker exit {exit_s:.1f}s after SIGTERM; rss {memory}")
    # Then it finished its running batches (no chunk is left under its lease) and left,
    # giving its reserved messages back
    assert "Warm shutdown" in w0.log()
    assert exit_s < FAST["task_soft_time_limit_s"], exit_s
    assert in_progress(handle.id) == 0
    assert not any(r["hostname"].startswith("w0") for r in worker_memory(runtime().settings))
    # and a new worker completes the job with no call made twice
    workers(env, concurrency=2)
    wait_until(lambda: finished(handle.id), 60, "the job to end")
    assert_exactly_once(handle.id, sim, max_lost_calls=0)


class PrivateRedis:
    """A redis-server of the test's own on a free port, with its append-only file on (fsync every
    second, as a production Redis keeps a broker), so that killing it disturbs nobody else."""

    def __init__(self, home: Path) -> None:
        self.dir = home
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        wait_until(lambda: _answers(client), 30, "the private Redis to answer")
        client.close()

    def kill(self) -> None:
        """SIGKILL: a crash. What the last second wrote may be lost with it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: cannot start a private Redis")
    r = PrivateRedis(tmp_path / "redis")
    try:
        yield r
    finally:
        r.remove()


# Its bound (below) is longer than the suite's 300 s a test.
@pytest.mark.timeout(900)
def test_workers_killed_every_10s_and_redis_down_45s_end_the_job_succeeded_with_no_command(
    simulator: Any, docq_env: Any, workers: Any, own_redis: PrivateRedis, tmp_path: Path
) -> None:
    # Given the job: 1,000 one-chunk documents in batches of 20, 2% of calls answered
    # 5xx, two workers and `docq beat` (the reconciler every 10 s instead of a minute) on a
    # Redis of the test's own with its append-only file on, every other setting as shipped;
    # calls of 0.6-1.4 s, 16 in flight at once, so the job outlives the faults below
    sim = simulator("--latency-ms", "600", "--jitter-ms", "800", "--fail-rate", "0.02",
                    "--seed", "41", "--record-requests")
    env = docq_env(sim.url, broker_url=own_redis.url, reconcile_every_s=10,
                   llm_max_inflight=16, batch_max_chunks=20, batch_min_chunks=20,
                   chunk_tokens=40, chunk_overlap_tokens=0)
    victim, _ = workers(env, concurrency=2), workers(env, concurrency=2)
    beat_log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen([str(DOCQ), "beat"], env={**os.environ, **env}, stdout=beat_log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        handle = submit(corpus(1000, sentences=1), "summarize")
        assert tally(handle.id)["chunks"] == 1000
        # When one of the two workers (with its pool) is SIGKILLed every 10 s for six rounds and
        # started again at once, as a supervisor would, and after the third round Redis crashes
        # (SIGKILL) and comes back 45 s later from its append-only file
        kills: list[float] = []
        outage: tuple[float, float] | None = None
        for round_ in range(6):
            time.sleep(10)
            if finished(handle.id):
                break
            victim.kill()
            kills.append(time.time())
            victim = workers(env, concurrency=2)
            if round_ == 2:
                down = time.time()
                own_redis.kill()
                time.sleep(45)
                own_redis.start()
                outage = (down, time.time())
        # The bound: the job's calls take about 70 s with no fault; the outage 45 s; each kill
        # costs its batches the heartbeat's TTL and the rescuer's tick (12 s); a lapse the
        # outage leaves is found by the reconciler within its 10 s. 600 s on a loaded machine;
        # a job still running then has lost work for good.
        wait_until(lambda: finished(handle.id), 600, "the job to end", poll_s=1)
        took = time.monotonic() - started
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        beat.wait(30)
        beat_log.close()
    # Then it ended succeeded, one ok row per chunk, with no command typed, and the calls made
    # twice are at most those in flight at a kill or at the crash of Redis
    assert len(kills) == 6 and outage is not None, ("the job ended before the faults", kills)
    requests = sim.requests()
    in_flight = sum(1 for t in [*kills, outage[0]] for r in requests
                    if r["start"] < t and r["end"] > t - 0.5)
    t = tally(handle.id)
    print(f"\nfigures: kills={len(kills)} redis down {outage[1] - outage[0]:.0f} s, "
          f"job status {t['status']} after {took:.0f} s, in flight at the faults {in_flight}")
    assert_exactly_once(handle.id, sim, max_lost_calls=in_flight)
