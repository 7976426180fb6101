"""`docq worker` as users run it: its processes, what it does when one dies, its defaults."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil
import pytest

from docqueue.tasks import submit
from docqueue.tasks.celery import state_redis
from docqueue.tasks.supervisor import Layout, default_layout
from docqueue.workers.batch.liveness import batch_slots
from docqueue.workers.settings import Settings

pytestmark = pytest.mark.integration


def test_the_default_layout_holds_the_in_flight_cap_in_the_smallest_open_batches() -> None:
    # Batches of 16 to 100 chunks: the cap of 256 in 16-chunk batches, 8 per process
    assert default_layout(Settings(llm_max_inflight=256, worker_concurrency=2)) == Layout(2, 8)
    assert default_layout(Settings(llm_max_inflight=256, batch_min_chunks=8,
                                   worker_concurrency=2)) == Layout(2, 16)
    # Batches of 25 chunks each: twice the cap in open batches
    settings = Settings(llm_max_inflight=256, batch_max_chunks=25, batch_min_chunks=25,
                        worker_concurrency=2)
    assert default_layout(settings) == Layout(processes=2, batches=11)
    assert default_layout(Settings(worker_concurrency=3, worker_batches=5)) == Layout(3, 5)
    assert default_layout(Settings(llm_max_inflight=8, worker_concurrency=2)).batches == 4
    # `docq worker -c 1` holds the whole cap in its one process
    assert default_layout(settings, processes=1) == Layout(processes=1, batches=21)


def test_a_killed_worker_process_is_replaced_and_the_job_completes(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given `docq worker` with two processes on a job of slow calls
    sim = simulator("--latency-ms", "800", "--seed", "5")
    env = docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, batch_max_chunks=4)
    w = workers(env, concurrency=2)
    first = set(w.children())
    assert len(first) == 2
    # (each process's heartbeat says how many batches it runs at once, 2 x 64 in all: what a
    # job's last batches are sized by)
    deadline = time.monotonic() + 30
    while batch_slots(state_redis()) != 128 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert batch_slots(state_redis()) == 128
    docs = [(f"note-{i}", " ".join(["the harbour at dawn, boats and nets."] * 12))
            for i in range(16)]
    handle = submit(docs, "summarize")
    deadline = time.monotonic() + 30
    while sim.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    # When one of its processes is killed (the OOM killer, a crash)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    # Then another takes its place, and the job completes with a result for every chunk
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = {p.pid for p in psutil.Process(w.proc.pid).children()}
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    assert victim not in now and len(now) == 2, now
    final = handle.wait(timeout=180)
    assert final["status"] == "succeeded", final
    assert final["chunks_by_state"] == {"ok": final["chunks_total"]}, final
    assert "ended with SIGKILL; starting another" in w.log()
    assert batch_slots(state_redis()) == 128  # the replacement counted once
