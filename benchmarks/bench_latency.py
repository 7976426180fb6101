"""Benchmark latency-bound work: does docqueue keep the configured in-flight cap busy?

    python benchmarks/bench_latency.py [--chunks 4000] [--latency-ms 2000] [--cap 256]

The provider simulator answers every request after --latency-ms (2 s), with no rate limits. A
job of --chunks one-chunk documents runs with DOCQ_LLM_MAX_INFLIGHT = --cap (256). While it runs,
the benchmark reads the simulator's count of requests in flight every 100 ms. The steady part
is the time between 10% and 90% of the calls answered; the target is a mean in flight of at
least 90% of the cap there, so throughput is cap / latency.

Each --layout is one `celery -A docqueue.tasks worker` process, POOL:CONCURRENCY. The default runs
`threads:16` (one process running 16 batches of 25 chunks at once on one event loop: the
latency-bound layout, `docq worker --pool threads -c 16`) and, for comparison, `prefork:2`
(`docq worker`'s default: two processes, one batch each).

Prints a table and writes benchmarks/results/latency.json.
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

from benchmarks.bench_overhead import MAX_TOKENS, corpus
from benchmarks.harness import (
    DEFAULT_PG_URL,
    check_redis,
    results_store,
    start_worker,
    table,
    wait_for_job,
    write_json,
)
from docqueue.workers.testing.simulator.process import SimulatorProcess

TARGET_SHARE = 0.9
SAMPLE_S = 0.1


class InFlightSampler(threading.Thread):
    """Reads the simulator's in-flight and answered counts every SAMPLE_S seconds."""

    def __init__(self, sim: SimulatorProcess) -> None:
        super().__init__(daemon=True)
        self.sim = sim
        self.samples: list[tuple[float, int, int]] = []  # (time, in flight, answered so far)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            st = self.sim.stats()
            self.samples.append((time.monotonic(), st["in_flight"], st["requests_total"]))
            time.sleep(SAMPLE_S)


def steady(samples: list[tuple[float, int, int]], total: int) -> list[tuple[float, int, int]]:
    """The samples between 10% and 90% of the calls answered."""
    return [s for s in samples if 0.1 * total <= s[2] <= 0.9 * total]


def run(args: argparse.Namespace, workdir: Path, layout: str) -> dict[str, Any]:
    from docqueue.tasks import submit
    from docqueue.tasks.runtime import reset_runtime

    admin = check_redis(args.redis_url)
    sim = SimulatorProcess("--latency-ms", str(args.latency_ms), "--seed", "7").start()
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / "home"),
                "DOCQ_LLM_MAX_TOKENS": str(MAX_TOKENS), "DOCQ_LLM_MAX_INFLIGHT": str(args.cap),
                **dict(kv.split("=", 1) for kv in args.env),
            }
            os.environ.update(env)
            reset_runtime()
            pool, concurrency = layout.split(":")
            worker = start_worker(env, workdir / f"worker-{pool}.log", "latency",
                                  int(concurrency), pool=pool)
            try:
                worker.wait_ready()
                time.sleep(1.0)
                load = os.getloadavg()[0]
                sampler = InFlightSampler(sim)
                sampler.start()
                t0 = time.monotonic()
                handle = submit(corpus(args.chunks, seed=11), "summarize", name="latency")
                wait_for_job(handle.id, args.timeout_s, worker.log_path, poll_s=0.2)
                wall = time.monotonic() - t0
                sampler.done.set()
                sampler.join()
                st = handle.status()
                calls = sim.stats()["requests_total"]
            finally:
                worker.stop()
                reset_runtime()
    finally:
        sim.stop()
        admin.flushdb()
        admin.close()
    window = steady(sampler.samples, calls)
    in_flight = [s[1] for s in window]
    span = window[-1][0] - window[0][0] if len(window) > 1 else 0.0
    answered = window[-1][2] - window[0][2] if len(window) > 1 else 0
    mean = statistics.mean(in_flight) if in_flight else 0.0
    return {
        "layout": layout, "chunks": st["chunks_total"], "job": st["status"], "calls": calls,
        "latency_ms": args.latency_ms, "cap": args.cap, "wall_s": wall,
        "ideal_s": args.chunks / args.cap * args.latency_ms / 1000,
        "steady_s": span, "in_flight_mean": mean,
        "in_flight_p10": _quantile(in_flight, 0.1), "in_flight_max": max(in_flight, default=0),
        "share_of_cap": mean / args.cap,
        "steady_calls_per_s": answered / span if span else 0.0,
        "cap_over_latency": args.cap / (args.latency_ms / 1000), "load_before": load,
        "samples": len(in_flight),
        "series": [(round(t - t0, 2), n) for t, n, _ in sampler.samples],
    }


def _quantile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


COLUMNS = [
    ("layout", "worker"), ("chunks", "chunks"), ("cap", "cap"), ("latency_ms", "latency ms"),
    ("wall_s", "wall s"),
    ("ideal_s", "ideal s"), ("steady_s", "steady s"), ("in_flight_mean", "in flight mean"),
    ("in_flight_p10", "p10"), ("in_flight_max", "max"), ("share_of_cap", "share of cap"),
    ("steady_calls_per_s", "calls/s"), ("cap_over_latency", "cap/latency"), ("job", "job"),
    ("load_before", "load"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--latency-ms", type=float, default=2000)
    parser.add_argument("--cap", type=int, default=256, help="DOCQ_LLM_MAX_INFLIGHT (256)")
    parser.add_argument("--layout", action="append", metavar="POOL:N",
                        help="worker layouts to run (default threads:16 and prefork:2)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="DOCQ_X=V")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the worker log")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json-name", default="latency", help="benchmarks/results/NAME.json")
    args = parser.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        for i in range(args.runs):
            for layout in args.layout or ["threads:16", "prefork:2"]:
                rows.append({"run": i + 1, **run(args, tmp, layout)})
    finally:
        if args.keep:
            print(f"worker logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(table([{k: v for k, v in r.items() if k != "series"} for r in rows],
                [("run", "run"), *COLUMNS]))
    print(f"target: in-flight mean over the steady part >= {TARGET_SHARE} x cap")
    path = write_json(args.json_name, {"env": args.env, "target_share": TARGET_SHARE, "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
