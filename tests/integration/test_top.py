"""`docq top --once`: one frame with every running job and the limiter, as a user reads it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from docqueue.tasks import submit
from tests.integration.test_pipeline import corpus

pytestmark = pytest.mark.integration

DOCQ = [sys.executable, "-c", "from docqueue.tasks.cli import main; main()"]


def top_once(env: dict[str, str]) -> str:
    done = subprocess.run([*DOCQ, "top", "--once"], env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_top_shows_the_running_job_and_the_limiter_then_nothing_running(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a slow simulator with a request limit and a worker on a job of 60 chunks (at two
    # calls of 0.4 s at a time, 12 s: `docq top` takes seconds to start on a loaded machine)
    sim = simulator("--latency-ms", "400", "--seed", "3")
    env = docq_env(sim.url, llm_rpm=600, worker_inflight=2)
    workers(env, concurrency=1)
    handle = submit(corpus(60), "summarize", cache="off")
    deadline = time.monotonic() + 60
    while handle.status()["chunks_done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)

    # When a user asks for one frame while it runs
    frame = top_once(env)

    # Then the job's row and the limiter's lines are there
    row = next(line for line in frame.splitlines() if f"│ {handle.id} " in line)
    assert "summarize" in row and "/60 " in row and "%" in row
    assert "1 running job" in frame
    assert "requests/min: used" in frame and "of 600 (configured)" in frame
    assert "in flight:" in frame and "of 256" in frame

    # and once the job has ended, it is gone from the frame
    handle.wait(timeout=120)
    assert "no running jobs" in top_once(env)
