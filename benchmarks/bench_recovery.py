"""Benchmark recovery: how soon a killed worker's batches go on, and what killing costs a job.

    python benchmarks/bench_recovery.py [--chunks 1200] [--kill-every-s 12] [--runs 1]

The job of the issue that asked for it (#19): --chunks one-chunk documents in batches of 20,
against the simulator with 0.1-0.7 s a call (0.4 s +- 0.3 s) and 3% of calls answered 5xx, on
two `docq worker`s of two pool processes each, with the shipped time limits, heartbeat and
lease (Redis would give a dead worker's messages back after an hour). Each run is two jobs:

- fault-free: the two workers run the job to its end;
- killed: every --kill-every-s seconds the worker holding a batch (the other one if neither)
  is SIGKILLed with its pool processes, and a new worker is started in its place, as a
  supervisor would; the last kill is at least one interval before the job ends.

For each kill the benchmark reads, from the store, the chunks the dead deliveries held without
a result, and from the simulator's request record the first call of each of them after the
kill: "recall s" is the time from the SIGKILL to the first such call (the batch going on in
another worker), "all recalled s" to the last chunk's. The target is a killed job that ends
within 1.5 x the fault-free time + 30 s, with one row per chunk. "lost calls" are calls whose
answer was not recorded (killed in flight, or answered and not yet written).

Prints a table and writes benchmarks/results/recovery.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

from benchmarks.bench_overhead import corpus
from benchmarks.harness import (
    DEFAULT_PG_URL,
    check_redis,
    results_store,
    start_worker,
    table,
    wait_for_job,
    write_json,
)
from docqueue.tasks.worker_process import WorkerProcess
from docqueue.workers.testing.simulator.process import SimulatorProcess

TARGET_FACTOR, TARGET_EXTRA_S = 1.5, 30.0


class Killer(threading.Thread):
    """Every `every_s`, SIGKILL the worker holding a batch and start a new one in its place."""

    def __init__(self, workers: list[WorkerProcess], start: Any, job_id: int, every_s: float):
        super().__init__(daemon=True)
        self.workers, self.start_worker, self.job_id, self.every_s = workers, start, job_id, every_s
        self.kills: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            if _unfinished(self.job_id) == 0:
                return
            victim = self._victim()
            pids = victim.children()
            victim.kill()
            killed = time.time()
            orphans = _leased_by(pids, self.job_id)
            self.workers.remove(victim)
            self.workers.append(self.start_worker())
            self.kills.append({"at": killed, "worker": victim.name, "orphans": orphans})

    def _victim(self) -> WorkerProcess:
        holding = [w for w in self.workers if _leased_by(w.children(), self.job_id)]
        return holding[0] if holding else self.workers[len(self.kills) % len(self.workers)]


def _leased_by(pids: list[int], job_id: int) -> dict[int, str]:
    """Chunks without a final result leased by a delivery in one of `pids`: id -> text."""
    from sqlalchemy import or_, select

    from docqueue.models import FINAL_RESULT_STATES, Chunk, Result
    from docqueue.tasks.runtime import runtime

    if not pids:
        return {}
    with runtime().sessions() as s:
        final = select(Result.chunk_id).where(Result.job_id == job_id,
                                              Result.status.in_(FINAL_RESULT_STATES))
        rows = s.execute(select(Chunk.id, Chunk.text).where(
            Chunk.job_id == job_id, Chunk.id.not_in(final),
            or_(*[Chunk.lease_owner.like(f"{pid}:%") for pid in pids]))).all()
    return {r.id: r.text for r in rows}


def _unfinished(job_id: int) -> int:
    from docqueue.tasks import JobHandle

    st = JobHandle(job_id).status()
    return int(st["chunks_total"]) - int(st["chunks_done"])


def _prompt(text: str) -> str:
    from docqueue.workers.pipelines import build_pipeline

    messages = build_pipeline("summarize", {}).render(text, "chat").messages
    assert messages is not None
    return messages[-1]["content"]


def run_job(args: argparse.Namespace, workdir: Path, kill: bool, seed: int) -> dict[str, Any]:
    from sqlalchemy import func, select

    from docqueue.models import Result
    from docqueue.tasks import submit
    from docqueue.tasks.runtime import reset_runtime, runtime

    admin = check_redis(args.redis_url)
    sim = SimulatorProcess("--latency-ms", "100", "--jitter-ms", "600", "--fail-rate",
                           str(args.fail_rate), "--seed", str(seed), "--record-requests").start()
    started: list[WorkerProcess] = []
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / "home"),
                "DOCQ_BATCH_MAX_CHUNKS": str(args.batch), "DOCQ_RETRY_BACKOFF_BASE_S": "0.2",
                **dict(kv.split("=", 1) for kv in args.env),
            }
            os.environ.update(env)
            reset_runtime()

            def new_worker() -> WorkerProcess:
                w = start_worker(env, workdir / f"w{len(started)}.log", f"w{len(started)}",
                                 args.concurrency)
                started.append(w)
                return w

            live = [new_worker() for _ in range(args.workers)]
            for w in live:
                w.wait_ready()
            time.sleep(1.0)
            load = os.getloadavg()[0]
            t0, submitted = time.monotonic(), time.time()
            handle = submit(corpus(args.chunks, seed=seed), "summarize", name="recovery")
            killer = Killer(live, new_worker, handle.id, args.kill_every_s) if kill else None
            if killer is not None:
                killer.start()
            wait_for_job(handle.id, args.timeout_s, workdir / "w0.log", poll_s=0.2)
            wall = time.monotonic() - t0
            if killer is not None:
                killer.done.set()
                killer.join()
            st = handle.status()
            requests = sim.requests()
            with runtime().sessions() as s:
                rows, distinct, attempts = s.execute(
                    select(func.count(), func.count(func.distinct(Result.chunk_id)),
                           func.sum(Result.attempts)).where(Result.job_id == handle.id)).one()
    finally:
        for w in started:
            w.stop()
        sim.stop()
        admin.flushdb()
        admin.close()
    calls = len(requests)
    recalls, all_recalled = [], []
    kills = killer.kills if killer is not None else []
    for k in kills:
        wanted = {_prompt(text) for text in k["orphans"].values()}
        first: dict[str, float] = {}
        for r in requests:
            if r["start"] >= k["at"] and r["prompt"] in wanted and r["prompt"] not in first:
                first[r["prompt"]] = r["start"]
        k["recalled"] = len(first)
        if first:
            recalls.append(min(first.values()) - k["at"])
            all_recalled.append(max(first.values()) - k["at"])
    return {
        "scenario": f"killed every {args.kill_every_s:g} s" if kill else "fault-free",
        "chunks": st["chunks_total"], "job": st["status"], "wall_s": wall, "kills": len(kills),
        "orphans": sum(len(k["orphans"]) for k in kills),
        "recall_median_s": statistics.median(recalls) if recalls else None,
        "recall_max_s": max(recalls) if recalls else None,
        "all_recalled_max_s": max(all_recalled) if all_recalled else None,
        "calls": calls, "attempts": int(attempts or 0), "lost_calls": calls - int(attempts or 0),
        "rows": rows, "distinct_rows": distinct, "load_before": load,
        "kill_log": [{"after_s": round(k["at"] - submitted, 1),
                      "worker": k["worker"], "orphans": len(k["orphans"]),
                      "recalled": k["recalled"]} for k in kills],
    }


COLUMNS = [
    ("run", "run"), ("scenario", "scenario"), ("chunks", "chunks"), ("wall_s", "job s"),
    ("kills", "kills"), ("orphans", "orphaned chunks"), ("recall_median_s", "recall median s"),
    ("recall_max_s", "recall max s"), ("all_recalled_max_s", "all recalled max s"),
    ("calls", "calls"), ("lost_calls", "lost calls"), ("rows", "rows"), ("job", "job"),
    ("load_before", "load"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=20, help="DOCQ_BATCH_MAX_CHUNKS (20)")
    parser.add_argument("--fail-rate", type=float, default=0.03)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kill-every-s", type=float, default=12.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="DOCQ_X=V")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="keep the worker logs")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json-name", default="recovery", help="benchmarks/results/NAME.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    try:
        for i in range(args.runs):
            seed = 31 + i
            base = run_job(args, tmp / f"run{i}-base", kill=False, seed=seed)
            faulty = run_job(args, tmp / f"run{i}-kill", kill=True, seed=seed)
            bound = TARGET_FACTOR * base["wall_s"] + TARGET_EXTRA_S
            faulty["target_s"] = bound
            faulty["within_target"] = faulty["wall_s"] <= bound
            faulty["over_fault_free"] = faulty["wall_s"] / base["wall_s"]
            rows += [{"run": i + 1, **base}, {"run": i + 1, **faulty}]
    finally:
        if args.keep:
            print(f"worker logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table([{k: v for k, v in r.items() if k != "kill_log"} for r in rows], COLUMNS))
    for r in rows:
        if "target_s" in r:
            print(f"run {r['run']}: killed job {r['wall_s']:.1f} s = {r['over_fault_free']:.2f} x "
                  f"fault-free; target <= {TARGET_FACTOR:g} x fault-free + {TARGET_EXTRA_S:g} s "
                  f"= {r['target_s']:.1f} s: {'met' if r['within_target'] else 'MISSED'}")
    path = write_json(args.json_name, {"env": args.env, "target_factor": TARGET_FACTOR,
                                       "target_extra_s": TARGET_EXTRA_S, "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
