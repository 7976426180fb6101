"""Streaming submission with real processes: the first calls come while `submit` still reads,
the job's merge runs once its last document is recorded, and a producer killed mid-submit
leaves a job that says so, which `docq resume` finishes with every document and chunk once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from docqueue.models import FINAL_JOB_STATES, Document, Job
from docqueue.tasks import submit
from docqueue.tasks.api import ProducerBeat, job_status, producer_alive
from docqueue.tasks.runtime import runtime
from tests.integration.test_crash_safety import model_calls, tally, wait_until

pytestmark = pytest.mark.integration

DOCQ = Path(sys.executable).parent / "docq"


def slow_corpus(n: int, pause_every: int = 10, pause_s: float = 0.005
                ) -> Iterator[tuple[str, str]]:
    """One-chunk documents, each different, read at about 2,000 a second: a slow source."""
    for i in range(n):
        if i % pause_every == 0:
            time.sleep(pause_s)
        yield f"doc-{i}", f"Ship {i} left port {i * 31 % 977} at dawn carrying {i % 40 + 1} crates."


def test_first_calls_come_before_submit_returns_and_the_job_merges_once(
    simulator: Callable[..., Any], docq_env: Callable[..., dict[str, str]],
    workers: Callable[..., Any],
) -> None:
    # Given workers up and a source of 3,000 one-chunk documents that takes over a second
    sim = simulator("--latency-ms", "20", "--seed", "30", "--record-requests")
    env = docq_env(sim.url)
    workers(env)
    started = time.time()

    # When they are submitted
    handle = submit(slow_corpus(3000))
    returned = time.time()
    final = handle.wait(timeout=180)

    # Then the first model call came before submit returned, while it was still reading
    first_call = min(r["start"] for r in sim.requests())
    assert first_call < returned, (first_call - started, returned - started)
    # And the job ended once, succeeded, with every chunk answered exactly once
    assert final["status"] == "succeeded", final
    assert not final["ingesting"] and final["ingested_at"] is not None
    assert (final["documents_total"], final["chunks_total"]) == (3000, 3000)
    assert final["chunks_by_state"] == {"ok": 3000}
    t = tally(handle.id)
    assert t["rows"] == t["distinct"] == t["chunks"] == t["ok"] == 3000, t
    assert model_calls(sim) == t["attempts"] == 3000
    # And the merge that finalized it saw the whole job: its totals are the job's
    with runtime().sessions() as s:
        job = s.get(Job, handle.id)
        assert job is not None
        assert (job.chunks_ok, job.chunks_error, job.chunks_other) == (3000, 0, 0)
        assert job.submitted_at is not None and job.ingested_at is not None
        assert job.submitted_at < job.ingested_at  # running before its last document came
        assert job.finished_at is not None and job.finished_at >= job.ingested_at
        assert job.batches_total > 1
    print(f"\nfigures: first call {first_call - started:.2f}s after submit started, "
          f"submit returned after {returned - started:.2f}s; {job.batches_total} batches")


def test_a_producer_killed_mid_submit_leaves_an_ingesting_job_that_resume_finishes(
    simulator: Callable[..., Any], docq_env: Callable[..., dict[str, str]],
    workers: Callable[..., Any], tmp_path: Path,
) -> None:
    # Given workers up and a JSONL file of 12,000 one-chunk documents
    sim = simulator("--seed", "31", "--record-requests")
    env = docq_env(sim.url, batch_max_chunks=25)
    workers(env)
    n = 12_000
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"d{i}", "text": f"Barge {i} moored at berth "
                                  f"{i * 7 % 613} with {i % 30 + 2} tons of grain."}) + "\n")

    # When `docq submit` is killed (SIGKILL) once its first batches are out
    with runtime().sessions() as s:
        before = s.scalar(select(func.max(Job.id))) or 0
    with (tmp_path / "submit.err").open("wb") as err:
        proc = subprocess.Popen([str(DOCQ), "submit", corpus.name, "--json"], cwd=tmp_path,
                                env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=err)
        job_id = _recording(proc, before, tmp_path / "submit.err")
        assert producer_alive(job_id) == f"{os.uname().nodename}:{proc.pid}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # Its heartbeat goes within its TTL (a live one would make `docq resume JOB` refuse)
    wait_until(lambda: producer_alive(job_id) is None, ProducerBeat.TTL_S + 2,
               "the killed producer's heartbeat to lapse")

    # Then the job is not final and says it is ingesting, even once its published batches end
    with runtime().sessions() as s:
        recorded = s.scalar(select(func.count()).select_from(Document)
                            .where(Document.job_id == job_id))
    assert recorded is not None and 0 < recorded < n
    _settled(job_id)  # the batches it published are answered
    # The reconciler's rules (what beat runs) must not finalize it either
    subprocess.run([str(DOCQ), "resume"], env={**os.environ, **env}, capture_output=True,
                   timeout=120, check=True)
    st = job_status(job_id)
    assert st["status"] == "running" and st["ingesting"], st
    shown = subprocess.run([str(DOCQ), "status", str(job_id)], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ingesting" in shown and f"docq resume {job_id}" in shown, shown

    # When `docq resume JOB` runs (from another directory: the paths were given relative)
    out = subprocess.run([str(DOCQ), "resume", str(job_id)], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "ingestion resumed" in out.stdout, out.stdout
    wait_until(lambda: job_status(job_id)["status"] in FINAL_JOB_STATES, 240, "the job final")

    # Then every document is recorded once, and every chunk answered by exactly one call
    final = job_status(job_id)
    assert final["status"] == "succeeded" and not final["ingesting"], final
    with runtime().sessions() as s:
        ids = s.scalars(select(Document.external_id).where(Document.job_id == job_id)
                        .order_by(Document.id)).all()
    assert ids == [f"d{i}" for i in range(n)]
    assert (final["documents_total"], final["chunks_total"]) == (n, n)
    t = tally(job_id)
    assert t["rows"] == t["distinct"] == t["chunks"] == t["ok"] == n, t
    assert model_calls(sim) == t["attempts"] == n
    print(f"\nfigures: {recorded} of {n} documents recorded at the kill; resumed to {len(ids)}")


def test_resume_of_a_job_read_from_an_iterable_says_it_cannot_read_it_again(
    simulator: Callable[..., Any], docq_env: Callable[..., dict[str, str]],
) -> None:
    # Given a job from an in-memory iterable whose producer stopped mid-submit (no workers: a
    # generator that raises stands for the producer's death after its first commits)
    sim = simulator("--seed", "32")
    env = docq_env(sim.url)

    def dies() -> Iterator[tuple[str, str]]:
        yield from slow_corpus(6000, pause_every=1000, pause_s=0.4)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit(dies())
    with runtime().sessions() as s:
        job_id = s.scalar(select(func.max(Job.id)))
    assert job_id is not None
    assert job_status(job_id)["ingesting"]

    # When it is resumed while a producer still beats for it, then resume refuses, naming it
    with ProducerBeat(job_id) as beat:
        out = subprocess.run([str(DOCQ), "resume", str(job_id)], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"still being recorded by its producer ({beat.name})" in out.stderr, out.stderr
    # When it is resumed with no producer, then it says why not, in one line, without a
    # traceback
    out = subprocess.run([str(DOCQ), "resume", str(job_id)], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert "in-memory iterable" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def _settled(job_id: int) -> None:
    """Wait until the job's result rows stop changing for two seconds."""
    last, since = -1, time.monotonic()
    deadline = since + 120
    while time.monotonic() < deadline:
        rows = tally(job_id)["rows"]
        if rows != last:
            last, since = rows, time.monotonic()
        elif time.monotonic() - since > 2:
            return
        time.sleep(0.2)
    raise AssertionError("the job's results kept changing for 120 s")


def _recording(proc: subprocess.Popen[bytes], before: int, err: Path) -> int:
    """The id of the job `proc` is recording, once it has published its first batches."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, err.read_text()
        with runtime().sessions() as s:
            row = s.execute(select(Job.id, Job.status).where(Job.id > before)
                            .order_by(Job.id.desc()).limit(1)).one_or_none()
        if row is not None and row.status == "running":
            return int(row.id)
        time.sleep(0.02)
    raise AssertionError("submit recorded nothing within 90 s")
