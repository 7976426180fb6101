"""A latency-bound job end to end, `docq submit` included, beside the asyncio peer: where the
time before and after the call phase goes.

    python benchmarks/bench_tail.py [--docs 3000] [--latency 0.8-2.0] [--runs 1]
    python benchmarks/bench_tail.py --latency 10 --no-limits      # the 10 s case of issue 30

One provider simulator (calls of --latency seconds: a fixed figure, or LOW-HIGH drawn uniformly;
by default publishing high limits, 30,000 RPM and 20M TPM, in its headers) serves both sides in
the same run:
- docqueue: the default `docq worker` (one process per core, DOCQ_LLM_MAX_INFLIGHT 256) and
  `docq submit FILE.jsonl` as a user runs it, timed from the command's start to the job's final
  state in the store (the merge's commit, polled every POLL_S);
- the peer (benchmarks/peer.py): one asyncio process, 256 calls in flight, the same requests
  (rendered from the same documents, inside its timing) to the same simulator.

Every document is one chunk of DOC_TOKENS tokens. Figures per side: wall time, the time to the
first call and from the last answer to the end (the simulator's calls in flight, sampled every
SAMPLE_S: the first sample with one in flight, the last with any), the mean in flight over the
call phase; for docqueue also when the merge task started and ended (the worker's log: Celery's
"succeeded in" line, less its run time) against the last answer and the last result row written.
The ratio is docqueue's wall time over the peer's (the issue's target: <= 1.05).

Prints a table and writes benchmarks/results/tail.json (--json-name).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

from sqlalchemy import func, select

from benchmarks.harness import (
    DEFAULT_PG_URL,
    check_redis,
    one_chunk_corpus,
    results_store,
    table,
    write_json,
)
from benchmarks.peer import run_peer
from docqueue.models import FINAL_JOB_STATES, Job, Result
from docqueue.tasks.worker_process import WorkerProcess
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.testing.simulator.process import SimulatorProcess

MAX_TOKENS = 50
DOC_TOKENS = 60
CAP = 256
RPM, TPM = 30_000, 20_000_000
SAMPLE_S = 0.05
POLL_S = 0.02
MERGED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/[^\]]*\] "
                    r"Task jobs\.merge\[[^\]]+\] succeeded in ([0-9.e-]+)s")


class InFlight(threading.Thread):
    """The simulator's calls in flight every SAMPLE_S seconds: (time.time(), in flight)."""

    def __init__(self, sim: SimulatorProcess) -> None:
        super().__init__(daemon=True)
        self.sim, self.done = sim, threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            with contextlib.suppress(OSError):
                self.samples.append((time.time(), int(self.sim.stats()["in_flight"])))

    def series(self, since: float) -> list[tuple[float, int]]:
        """The samples as (seconds since `since`, in flight), for reading where time went."""
        return [(round(t - since, 2), n) for t, n in self.samples if t >= since]

    def phase(self, since: float) -> tuple[float | None, float | None, float | None]:
        """First time with a call in flight, last time with one, the mean in flight between."""
        busy = [(t, n) for t, n in self.samples if t >= since and n > 0]
        if not busy:
            return None, None, None
        first, last = busy[0][0], busy[-1][0]
        level = [n for t, n in self.samples if first <= t <= last]
        return first, last, statistics.fmean(level)


def simulator_args(args: argparse.Namespace) -> list[str]:
    low, _, high = args.latency.partition("-")
    lo_ms = float(low) * 1000
    out = ["--latency-ms", f"{lo_ms:g}", "--seed", "7"]
    if high:
        out += ["--jitter-ms", f"{float(high) * 1000 - lo_ms:g}"]
    if not args.no_limits:
        out += ["--rpm", str(RPM), "--tpm", str(TPM)]
    return out


def merge_times(log: Path) -> tuple[float, float] | None:
    """(start, end) time.time() of the last `jobs.merge` that succeeded, from the worker log."""
    found = None
    for line in log.read_text(errors="replace").splitlines():
        if m := MERGED.match(line):
            end = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            found = (end - float(m[2]), end)
    return found


def run_docqueue(args: argparse.Namespace, sim: SimulatorProcess, docs: list[tuple[str, str]],
                 workdir: Path) -> dict[str, Any]:
    from docqueue.tasks.runtime import reset_runtime, runtime

    admin = check_redis(args.redis_url)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs))
    sampler = InFlight(sim)
    worker: WorkerProcess | None = None
    log = workdir / "worker.log"
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / "home"),
                "DOCQ_LLM_MAX_TOKENS": str(MAX_TOKENS), "DOCQ_CHUNK_OVERLAP_TOKENS": "0",
                "DOCQ_LLM_MAX_INFLIGHT": str(CAP),
                **dict(kv.split("=", 1) for kv in args.env),
            }
            for key in ("DOCQ_LLM_RPM", "DOCQ_LLM_TPM"):
                os.environ.pop(key, None)
            os.environ.update(env)
            reset_runtime()
            worker = WorkerProcess(env, log, name="btail", concurrency=os.cpu_count() or 1,
                                   pool="default")
            worker.wait_ready()
            time.sleep(1.0)  # the warm-up after "ready"
            load = os.getloadavg()[0]
            sampler.start()
            started = time.time()
            done = subprocess.run(
                [sys.executable, "-m", "docqueue.tasks.cli", "submit", str(corpus),
                 "--pipeline", "summarize", "--name", "bench-tail", "--json"],
                env={**os.environ, **env}, capture_output=True, text=True, check=True)
            returned = time.time()
            job_id = int(json.loads(done.stdout.strip().splitlines()[-1])["job_id"])
            deadline = time.monotonic() + args.timeout_s
            while True:
                with runtime().sessions() as s:
                    status = s.scalar(select(Job.status).where(Job.id == job_id))
                if status in FINAL_JOB_STATES:
                    final = time.time()
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"job {job_id} not done after {args.timeout_s:g}s; see {log}")
                time.sleep(POLL_S)
            with runtime().sessions() as s:
                last_row = s.scalar(select(func.max(Result.updated_at))
                                    .where(Result.job_id == job_id))
                chunks = s.scalar(select(func.count()).select_from(Result)
                                  .where(Result.job_id == job_id))
            merge = merge_times(log)
    finally:
        if args.keep_log is not None and log.exists():
            args.keep_log.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, args.keep_log / f"worker-{int(time.time())}.log")
        sampler.done.set()
        if worker is not None:
            worker.stop()
        reset_runtime()
        admin.flushdb()
        admin.close()
    first, last, mean = sampler.phase(started)
    return {
        "who": "docqueue", "status": status, "chunks": chunks, "load": load,
        "wall_s": final - started, "submit_s": returned - started,
        "first_call_s": None if first is None else first - started,
        "call_phase_s": None if first is None or last is None else last - first,
        "in_flight_mean": mean,
        "after_last_answer_s": None if last is None else final - last,
        "last_row_after_answer_s": (None if last is None or last_row is None
                                    else last_row.timestamp() - last),
        "merge_start_after_answer_s": None if merge is None or last is None else merge[0] - last,
        "merge_s": None if merge is None else merge[1] - merge[0],
        "merge_end_after_answer_s": None if merge is None or last is None else merge[1] - last,
        "series": sampler.series(started),
    }


def run_the_peer(sim: SimulatorProcess, docs: list[tuple[str, str]],
                 limits: bool) -> dict[str, Any]:
    sampler = InFlight(sim)
    sampler.start()
    load = os.getloadavg()[0]
    try:
        started = time.time()
        pipe = build_pipeline("summarize", {})
        charge = DOC_TOKENS + 30 + MAX_TOKENS  # the peer's own estimate; the limits are far off
        requests = [({"model": "docq-sim", "messages": pipe.render(text, "chat").messages,
                      "max_tokens": MAX_TOKENS, "temperature": 0.0}, charge) for _, text in docs]
        run = asyncio.run(run_peer(sim.url, "docq-sim", requests,
                                   rpm=RPM if limits else None, tpm=TPM if limits else None,
                                   max_inflight=CAP))
        final = time.time()
    finally:
        sampler.done.set()
    first, last, mean = sampler.phase(started)
    return {
        "who": "peer", "status": "succeeded", "chunks": len(run.done_at), "load": load,
        "wall_s": final - started, "first_call_s": None if first is None else first - started,
        "call_phase_s": None if first is None or last is None else last - first,
        "in_flight_mean": mean,
        "after_last_answer_s": None if last is None else final - last,
        "series": sampler.series(started),
    }


COLUMNS = [("run", "run"), ("who", "who"), ("chunks", "chunks"), ("wall_s", "wall s"),
           ("ratio", "ratio"), ("submit_s", "submit s"), ("first_call_s", "1st call s"),
           ("call_phase_s", "calls s"), ("in_flight_mean", "in flight"),
           ("after_last_answer_s", "end after last answer s"),
           ("last_row_after_answer_s", "last row s"),
           ("merge_start_after_answer_s", "merge start s"), ("merge_s", "merge s"),
           ("merge_end_after_answer_s", "merge end s"), ("status", "job"), ("load", "load")]


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "series"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--latency", default="0.8-2.0", metavar="S or LOW-HIGH",
                        help="seconds per call, fixed or uniform between LOW and HIGH")
    parser.add_argument("--no-limits", action="store_true",
                        help="publish no rate limits (docqueue's adaptive window then applies)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="DOCQ_X=V")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json-name", default="tail")
    parser.add_argument("--keep-log", type=Path, metavar="DIR", help="copy the worker log here")
    args = parser.parse_args()
    docs, _ = one_chunk_corpus(args.docs, 5, DOC_TOKENS, "Note", "note")
    rows: list[dict[str, Any]] = []
    for i in range(args.runs):
        sim = SimulatorProcess(*simulator_args(args)).start()
        try:
            with tempfile.TemporaryDirectory(prefix="docq-bench-tail-") as tmp:
                ours = {"run": i + 1, **run_docqueue(args, sim, docs, Path(tmp))}
            rows.append(ours)
            print(table([_brief(ours)], COLUMNS), file=sys.stderr)
            if not args.no_peer:
                peer = {"run": i + 1, **run_the_peer(sim, docs, not args.no_limits)}
                ours["ratio"] = ours["wall_s"] / peer["wall_s"]
                rows.append(peer)
                print(table([_brief(peer)], COLUMNS), file=sys.stderr)
        finally:
            sim.stop()
    print(f"latency {args.latency} s, {'no limits' if args.no_limits else 'limits published'}, "
          f"{args.docs} one-chunk documents, cap {CAP}")
    print(table([_brief(r) for r in rows], COLUMNS))
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        print(f"ratio docqueue/peer: {', '.join(f'{x:.3f}' for x in ratios)} (target <= 1.05)")
    path = write_json(args.json_name, {"latency": args.latency, "limits": not args.no_limits,
                                       "docs": args.docs, "cap": CAP, "env": args.env,
                                       "started": datetime.now(UTC).isoformat(), "runs": rows})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
