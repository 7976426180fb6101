"""The batch lane end to end: `submit(..., lane="batch")`, a real worker and a real `docq beat`
against the simulator's Batch API, the ledger in PostgreSQL."""

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

import httpx
import pytest
import redis
from sqlalchemy import func, select

from models import (
    FINAL_JOB_STATES,
    Chunk,
    Job,
    LedgerState,
    ProviderBatch,
    ProviderBatchChunk,
    Result,
)
from tasks import submit
from tasks.api import job_status
from tasks.runtime import runtime

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


def chunk_texts(job_id: int) -> list[str]:
    with runtime().sessions() as s:
        return list(s.scalars(select(Chunk.text).where(Chunk.job_id == job_id)
                              .order_by(Chunk.document_id, Chunk.seq)))


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
    batch_job = submit(docs, "summarize", lane="batch", cache="off")
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
