"""What a user sees while a job's calls fail for a shared cause: `docq submit --wait` says what is
wrong, for how long and what docqueue does about it, and stops saying it once it is over; a
refused API key fails the job at once, in its own words, and the key shows nowhere.

Each test runs `docq submit --wait` as a subprocess against real workers, Redis, PostgreSQL and
the provider simulator, and reads its output as a user would.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from docqueue.tasks.records import job_status
from docqueue.workers import keys
from docqueue.workers.clock import wall_s
from tests.conftest import free_port

pytestmark = pytest.mark.integration

DOCQ = [sys.executable, "-c", "from docqueue.tasks.cli import main; main()"]
EXIT_JOB_FAILED = 1
# The workers poll nothing here: a refused connection comes back at once, the record is written
# at the first one (workers/batch/trouble.py, AT_ONCE), and `docq submit --wait` reads it on its
# next poll, one second later (tasks/progress.py, `watch`). The promise is 10 s; what it leaves
# beside that second is the poll's own time (a store query and a Redis read) on a loaded
# two-core machine.
SAID_WITHIN_S = 10.0
RIGHT_KEY, WRONG_KEY = "sk-right-4a7c19e2", "sk-wrong-93b0d5f1"
WORKER_PROCESSES, INFLIGHT = 2, 2  # `docq worker`'s default layout, 2 calls each at most


class Lines:
    """A subprocess's output lines as they come, each with the wall-clock time it was read.
    As a context manager: the process is killed (if still running) and its pipe closed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.seen = proc, []
        self._new: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.kill()
        self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put((wall_s(), line.rstrip("\n")))
        self._new.put(None)  # the end of the output

    def wait_for(self, pattern: str, timeout_s: float) -> tuple[float, str]:
        """The first line (with its time) that matches, waiting up to `timeout_s`."""
        for at, line in self.seen:
            if re.search(pattern, line):
                return at, line
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._new.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                break
            self.seen.append(item)
            if re.search(pattern, item[1]):
                return item
        raise AssertionError(f"no line matched {pattern!r} within {timeout_s:g} s: "
                             f"{[line for _, line in self.seen]}")

    def rest(self, timeout_s: float) -> list[str]:
        """Every line, once the output has ended (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while (item := self._new.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            self.seen.append(item)
        self.proc.wait(10)
        return [line for _, line in self.seen]


def corpus(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"d{i}.txt").write_text(f"Document {i} tells of the harbour at dawn, ship {i}.\n")
    return root


def docq(env: dict[str, str], *args: str, timeout_s: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DOCQ, *args], env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


def test_submit_wait_says_the_endpoint_is_unreachable_then_stops_once_it_answers(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given workers whose endpoint is a port where nothing listens
    port = free_port()
    env = docq_env(f"http://127.0.0.1:{port}/v1")
    workers(env)

    # When a user submits a small job and waits, reading the output as it comes
    proc = subprocess.Popen([*DOCQ, "submit", str(corpus(tmp_path / "docs", 2)), "--wait"],
                            env={**os.environ, **env}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    with Lines(proc) as lines:
        _, head = lines.wait_for(r"^job \d+: ", timeout_s=120)
        job_id = int(head.split()[1].rstrip(":"))

        # Then, within 10 s of the first refused call, a line names the endpoint and the cause
        said_at, said = lines.wait_for(r"^trouble: ", timeout_s=120)
        trouble = job_status(job_id)["trouble"]
        assert trouble is not None, said
        first_call = datetime.fromisoformat(str(trouble["since"])).timestamp()
        assert said_at - first_call <= SAID_WITHIN_S, (said_at - first_call, said)
        assert f"endpoint http://127.0.0.1:{port}/v1 unreachable (connection refused)" in said
        assert "waiting, retrying every ~" in said
        # and Flower's view of the waiting batch (its retry, in the result backend) says it too
        assert any(f"127.0.0.1:{port}/v1 unreachable (connection refused)" in why
                   for why in retry_reasons(redis_client)), retry_reasons(redis_client)

        # When the endpoint comes up on that port
        simulator("--port", str(port))
        # (the batch comes back within its wait, at most 30 s: provider/retry.py, EndpointDown)
        out = lines.rest(timeout_s=180)

    # Then the job succeeds, the trouble is said to be over, and no trouble line follows
    assert proc.returncode == 0, out
    assert out[-1].startswith(f"job {job_id} succeeded: 2 ok"), out
    cleared = next(i for i, line in enumerate(out) if line.startswith("trouble cleared: "))
    assert f"endpoint http://127.0.0.1:{port}/v1 (unreachable, connection refused)" in out[cleared]
    assert not any(line.startswith("trouble:") for line in out[cleared:]), out
    # and the call that got through deleted the record
    assert not redis_client.exists(keys.job_trouble(job_id))


def retry_reasons(client: redis.Redis) -> list[str]:
    """The words of every batch task waiting to run again, as the result backend holds them."""
    found = []
    for key in client.scan_iter("celery-task-meta-*"):
        meta = json.loads(client.get(key) or b"{}")
        if meta.get("status") == "RETRY":
            found.append(" ".join(str(a) for a in (meta.get("result") or {}).get(
                "exc_message", [])))
    return found


def test_a_refused_key_fails_every_chunk_at_once_in_one_line_and_never_shows_the_key(
    simulator: Any, docq_env: Any, workers: Any, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given an endpoint that wants another key than the workers have, and a job of 40 chunks
    sim = simulator("--api-key", RIGHT_KEY, "--record-requests")
    env = docq_env(sim.url, llm_api_key=WRONG_KEY, worker_inflight=INFLIGHT)
    worker = workers(env, concurrency=WORKER_PROCESSES)

    # When a user submits it and waits
    done = docq(env, "submit", str(corpus(tmp_path / "docs", 40)), "--wait")
    job_id = int(done.stdout.split()[1].rstrip(":"))
    final = job_status(job_id)

    # Then the job failed with every chunk, for the one reason the endpoint gave, in one line
    reason = "the endpoint refused the API key (HTTP 401 invalid_api_key: Incorrect API key " \
             "provided.)"
    assert done.returncode == EXIT_JOB_FAILED, done.stdout + done.stderr
    assert final["chunks_by_state"] == {"error": 40}
    assert final["reason"] == f"40 chunks failed: {reason}"
    assert f"\n  40 chunks failed: {reason}" in done.stdout
    chunks = docq(env, "results", str(job_id), "--level", "chunk")
    assert {json.loads(line)["error"] for line in chunks.stdout.splitlines()} == {reason}
    # and no chunk was retried, nor sent once the first refusal came back: the simulator saw at
    # most the calls in flight then (each process stops at its own first refusal, or at the
    # job's stop flag, whichever comes first), all refused
    calls = sim.requests()
    assert {c["status"] for c in calls} == {"401"}
    assert len(calls) <= WORKER_PROCESSES * INFLIGHT, len(calls)
    # and quickly: nothing waited (no backoff, no endpoint wait); deliveries and the merge
    # take about a second here, a loaded machine several
    assert final["finished_at"] is not None and final["submitted_at"] is not None
    took = datetime.fromisoformat(final["finished_at"]) - datetime.fromisoformat(
        final["submitted_at"])
    assert took.total_seconds() < 30, took

    # And the key is nowhere: not in the output, the results, the status, the log or Redis
    status = docq(env, "status", str(job_id), "--json")
    shown = [done.stdout, done.stderr, chunks.stdout, status.stdout, status.stderr, worker.log(),
             *stored_values(redis_client)]
    assert not [text for text in shown if WRONG_KEY in text or RIGHT_KEY in text]


def stored_values(client: redis.Redis) -> list[str]:
    """Every key and value in the test's Redis DB, as text."""
    read = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
            "list": lambda key: client.lrange(key, 0, -1),
            "zset": lambda key: client.zrange(key, 0, -1)}
    found = []
    for key in client.scan_iter():
        kind = client.type(key).decode()
        found.append(f"{key!r} {read[kind](key) if kind in read else ''!r}")
    return found
