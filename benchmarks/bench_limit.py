"""Run at the provider's limit by default: docqueue's default `docq worker` beside a peer.

    python benchmarks/bench_limit.py [--only tpm,rpm,...] [--env DOCQ_X=V] [--no-peer]

Each scenario starts the provider simulator, runs one job through the default `docq worker`
(no flags: one process per core, many batches each), then the same requests through the peer
(benchmarks/peer.py: one asyncio process throttling as the OpenAI cookbook's parallel processor
does) on a fresh simulator of the same settings. Every document is one chunk of the same size,
so every call is charged the same (prompt + max_tokens, as OpenAI and the simulator charge).

Figures per run, from the simulator's own per-second counts of what it admitted:
- share: what the binding dimension admitted per second over the steady part (the first
  WARMUP_S and the last EDGE_S seconds of admissions left out) against its limit; for the
  latency-bound scenarios, the mean number of calls in flight over the same part against the
  cap; for the self-hosted server, answers per second against its best (saturation / latency);
  at zero latency, where 6,000 calls never empty the first minute's bucket, the whole job's
  chunks per second against the limit's per second (the worker's own speed is what is measured);
- job share: the time the whole job's charge allows (its charge beyond the first full bucket,
  at the limit's rate) against the time it took;
- 429 share, time to the first result after submit() returned, and the time the last 5% of
  chunks took;
- reserve err (docqueue): the largest gap between what a call reserved (docqueue's count of its
  prompt + max_tokens) and what the provider charged (its own count of the prompt, reported
  as usage.prompt_tokens, + max_tokens), as a share of the charge;
- CPU per chunk, from submit() to the job's end: the client's (docqueue's worker processes, or
  the peer's process) and everything's (with the simulator, Redis, PostgreSQL and submit; the
  JSON has each part).
zero-latency-lean runs docqueue with DOCQ_LLM_CLIENT=lean (no peer run: the peer is the same).
Prints a table and writes benchmarks/results/limit.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

import contextlib

from sqlalchemy import select

from benchmarks.harness import (
    DEFAULT_PG_URL,
    CpuMeter,
    check_redis,
    one_chunk_corpus,
    results_store,
    servers,
    table,
    write_json,
)
from benchmarks.peer import run_peer
from docqueue.models import Result
from docqueue.tasks.worker_process import WorkerProcess
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.testing.simulator.process import SimulatorProcess

MAX_TOKENS = 100
DOC_TOKENS = 190
WARMUP_S, EDGE_S = 30, 5
SAMPLE_S = 0.25


@dataclass(frozen=True)
class Scenario:
    name: str
    sim: tuple[str, ...]
    docs: int
    # "tokens", "requests", "inflight", "throughput" (answers per second) or "rate" (the whole
    # job's chunks per second against the limit's: a job that never empties the first bucket)
    measure: str
    limit: float  # of the measured dimension
    target: float
    env: dict[str, str] = field(default_factory=dict)
    peer_rpm: int | None = None
    peer_tpm: int | None = None
    cap: int = 256
    change_at_s: float | None = None  # the provider lowers its limits this long after submit
    change_to: dict[str, int] = field(default_factory=dict)
    peer: bool = True  # run the peer too (not for a second docqueue setting of a scenario)


SCENARIOS = [
    Scenario("tpm", ("--tpm", "60000", "--rpm", "100000", "--latency-ms", "300",
                     "--jitter-ms", "200"), 400, "tokens", 60000, 0.98,
             env={"DOCQ_LLM_TPM": "60000", "DOCQ_LLM_RPM": "100000"},
             peer_rpm=100000, peer_tpm=60000),
    Scenario("rpm", ("--rpm", "300", "--tpm", "10000000", "--latency-ms", "1000"), 600,
             "requests", 300, 0.98, env={"DOCQ_LLM_RPM": "300", "DOCQ_LLM_TPM": "10000000"},
             peer_rpm=300, peer_tpm=10000000),
    Scenario("latency-2s", ("--latency-ms", "2000",), 6000, "inflight", 256, 0.95),
    Scenario("latency-10s", ("--latency-ms", "10000",), 3000, "inflight", 256, 0.95),
    Scenario("learned", ("--tpm", "60000", "--rpm", "100000", "--latency-ms", "300",
                         "--jitter-ms", "200"), 400, "tokens", 60000, 0.95,
             peer_rpm=100000, peer_tpm=60000),
    Scenario("lowered", ("--tpm", "60000", "--rpm", "100000", "--latency-ms", "300",
                         "--jitter-ms", "200"), 500, "tokens", 30000, 0.95,
             env={"DOCQ_LLM_TPM": "60000", "DOCQ_LLM_RPM": "100000"},
             peer_rpm=100000, peer_tpm=60000, change_at_s=40, change_to={"tpm": 30000}),
    Scenario("self-hosted", ("--slots", "64", "--saturation", "32", "--latency-ms", "200",
                             "--ms-per-token", "10"), 4000, "throughput", 2400, 0.9),
    Scenario("zero-latency", ("--rpm", "30000", "--tpm", "100000000"), 6000, "rate",
             30000, 0.95, env={"DOCQ_LLM_RPM": "30000", "DOCQ_LLM_TPM": "100000000"},
             peer_rpm=30000, peer_tpm=100000000),
    Scenario("zero-latency-lean", ("--rpm", "30000", "--tpm", "100000000"), 6000, "rate",
             30000, 0.95, env={"DOCQ_LLM_RPM": "30000", "DOCQ_LLM_TPM": "100000000",
                               "DOCQ_LLM_CLIENT": "lean"}, peer=False),
]


def corpus(n: int, seed: int) -> tuple[list[tuple[str, str]], int]:
    """n one-chunk documents whose prompts all count the same tokens; and that count."""
    return one_chunk_corpus(n, seed, DOC_TOKENS, "Note", "note")


class Sampler(threading.Thread):
    """The simulator's calls in flight, every SAMPLE_S seconds."""

    def __init__(self, sim: SimulatorProcess) -> None:
        super().__init__(daemon=True)
        self.sim, self.done = sim, threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            with contextlib.suppress(OSError):
                self.samples.append((time.time(), int(self.sim.stats()["in_flight"])))


def lower_limits(sim: SimulatorProcess, after_s: float, values: dict[str, int]) -> threading.Timer:
    def post() -> None:
        request = urllib.request.Request(f"{sim.root_url}/limits", method="POST",
                                         data=json.dumps(values).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).read()

    timer = threading.Timer(after_s, post)
    timer.start()
    return timer


def run_docqueue(sc: Scenario, docs: list[tuple[str, str]], args: argparse.Namespace,
                 workdir: Path) -> dict[str, Any]:
    from docqueue.tasks import submit
    from docqueue.tasks.runtime import reset_runtime, runtime

    admin = check_redis(args.redis_url)
    sim = SimulatorProcess(*sc.sim, "--seed", "7").start()
    sampler = Sampler(sim)
    worker: WorkerProcess | None = None
    try:
        with results_store(args.pg_url, args.sqlite, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / "home"),
                "DOCQ_LLM_MAX_TOKENS": str(MAX_TOKENS), "DOCQ_CHUNK_OVERLAP_TOKENS": "0",
                "DOCQ_LLM_MAX_INFLIGHT": str(sc.cap), **sc.env,
                **dict(kv.split("=", 1) for kv in args.env),
            }
            for key in ("DOCQ_LLM_RPM", "DOCQ_LLM_TPM"):
                os.environ.pop(key, None)
            os.environ.update(env)
            reset_runtime()
            worker = WorkerProcess(env, workdir / f"{sc.name}-worker.log", name=f"b{sc.name}",
                                   concurrency=os.cpu_count() or 1, pool="default")
            worker.wait_ready()
            main = psutil.Process(worker.proc.pid)
            meter = CpuMeter({
                "workers": lambda: [main, *main.children(recursive=True)],
                "simulator": lambda: [psutil.Process(sim.pid)],
                "redis": lambda: servers("redis-server"), "postgres": lambda: servers("postgres"),
                "submit": lambda: [psutil.Process()],
            })
            meter.start()
            sampler.start()
            timer = lower_limits(sim, sc.change_at_s, sc.change_to) if sc.change_at_s else None
            handle = submit(docs, "summarize", name=f"bench-{sc.name}")
            returned = time.time()
            status = handle.wait(timeout=1800)["status"]
            cpu = meter.stop()
            if timer:
                timer.cancel()
            with runtime().sessions() as s:
                rows = s.execute(select(Result.updated_at, Result.latency_ms, Result.tokens_in)
                                 .where(Result.job_id == handle.id)).all()
            done_at = sorted(r.updated_at.timestamp() for r in rows)
            latencies = [r.latency_ms for r in rows if r.latency_ms is not None]
            # The prompt tokens the provider counted: what each call's reservation should be
            charged_prompts = [r.tokens_in for r in rows if r.tokens_in]
            stats = sim.stats()
    finally:
        sampler.done.set()
        if worker is not None:
            worker.stop()
        sim.stop()
        admin.flushdb()
        admin.close()
    who = "docqueue lean" if env.get("DOCQ_LLM_CLIENT") == "lean" else "docqueue"
    return {"who": who, "status": status, "returned": returned, "done_at": done_at,
            "stats": stats, "inflight": sampler.samples, "latencies_ms": latencies,
            "charged_prompts": charged_prompts, "cpu_s": cpu}


def run_the_peer(sc: Scenario, docs: list[tuple[str, str]], charge: int) -> dict[str, Any]:
    sim = SimulatorProcess(*sc.sim, "--seed", "7").start()
    sampler = Sampler(sim)
    pipe = build_pipeline("summarize", {})
    requests = [({"model": "docq-sim", "messages": pipe.render(text, "chat").messages,
                  "max_tokens": MAX_TOKENS, "temperature": 0.0}, charge) for _, text in docs]
    try:
        sampler.start()
        timer = lower_limits(sim, sc.change_at_s, sc.change_to) if sc.change_at_s else None
        meter = CpuMeter({"peer": lambda: [psutil.Process()],
                          "simulator": lambda: [psutil.Process(sim.pid)]})
        meter.start()
        started = time.time()
        run = asyncio.run(run_peer(sim.url, "docq-sim", requests, rpm=sc.peer_rpm,
                                   tpm=sc.peer_tpm, max_inflight=sc.cap))
        cpu = meter.stop()
        if timer:
            timer.cancel()
        stats = sim.stats()
    finally:
        sampler.done.set()
        sim.stop()
    return {"who": "peer", "status": "succeeded", "returned": started,
            "done_at": sorted(run.done_at), "stats": stats, "inflight": sampler.samples,
            "latencies_ms": run.latencies_ms, "cpu_s": cpu}


def figures(sc: Scenario, run: dict[str, Any], charge: int) -> dict[str, Any]:
    stats = run["stats"]
    series = {s["t"]: s for s in stats["per_second"]}
    admitting = sorted(t for t, s in series.items() if s["admitted"])
    first, last = admitting[0], admitting[-1]
    start = first + WARMUP_S
    if sc.change_at_s is not None:  # the new limit, from 60 s after the change
        start = int(run["returned"] + sc.change_at_s + 60)
    window = list(range(start, last - EDGE_S + 1))
    key = {"tokens": "admitted_tokens", "requests": "admitted", "throughput": "ok"}.get(
        sc.measure)
    if sc.measure == "inflight":
        level = [n for t, n in run["inflight"] if first + WARMUP_S <= t <= last - EDGE_S]
        share = statistics.fmean(level) / sc.limit if level else None
    elif sc.measure == "rate":
        done = run["done_at"]
        share = len(done) / max(1e-9, done[-1] - run["returned"]) * 60 / sc.limit
    elif len(window) < 10:
        share = None
    else:
        per_s = sum(series.get(t, {}).get(key, 0) for t in window) / len(window)
        share = per_s * 60 / sc.limit
    done = run["done_at"]
    total = len(done)
    requests = stats["requests_total"]
    limited = int(stats["by_status"].get("429", 0))
    job_share = None
    if sc.measure in ("tokens", "requests") and sc.change_at_s is None and done:
        amount = (requests - limited) * (charge if sc.measure == "tokens" else 1)
        allowed = max(0.0, amount - sc.limit) / (sc.limit / 60)
        job_share = allowed / max(1e-9, done[-1] - run["returned"])
    tail = done[-1] - done[int(0.95 * (total - 1))] if total else None
    per_chunk = {k: round(v * 1000 / max(1, total), 3) for k, v in run["cpu_s"].items()}
    # Reservation error: docqueue reserves its own count of the prompt + max_tokens; the
    # provider charges its count + max_tokens. The largest gap of any call, as a share.
    prompts = run.get("charged_prompts") or []
    reserve_error = (max(abs((charge - MAX_TOKENS) - p) for p in prompts) / charge
                     if prompts else None)
    return {
        "scenario": sc.name, "who": run["who"], "status": run["status"], "chunks": total,
        "share": None if share is None else round(share, 4), "target": sc.target,
        "job_share": None if job_share is None else round(job_share, 4),
        "rate_limited_share": round(limited / max(1, requests), 5), "requests": requests,
        "reservation_error": None if reserve_error is None else round(reserve_error, 4),
        "first_result_s": round(done[0] - run["returned"], 2) if done else None,
        "tail_5pct_s": None if tail is None else round(tail, 2),
        "wall_s": round(done[-1] - run["returned"], 1) if done else None,
        "chunks_per_s": round(total / max(1e-9, done[-1] - run["returned"]), 1) if done else None,
        "peak_in_flight": stats["peak_in_flight"],
        # CPU of each part (workers, simulator, Redis, PostgreSQL, submit; the peer) per chunk
        "cpu_ms_per_chunk": per_chunk,
        "client_cpu_ms": per_chunk.get("workers", per_chunk.get("peer")),
        "cpu_ms": round(sum(per_chunk.values()), 3),
        "p50_latency_ms": (round(statistics.median(run["latencies_ms"]))
                           if run["latencies_ms"] else None),
        # Calls admitted in each second from submit(), for reading where time went.
        "admitted_per_s": [series.get(t, {}).get("admitted", 0)
                           for t in range(int(run["returned"]), last + 1)],
    }


COLUMNS = [("scenario", "scenario"), ("who", "who"), ("share", "share of limit"),
           ("target", "target"), ("job_share", "job share"),
           ("rate_limited_share", "429 share"), ("reservation_error", "reserve err"),
           ("first_result_s", "1st result s"),
           ("tail_5pct_s", "last 5% s"), ("wall_s", "wall s"), ("chunks_per_s", "chunks/s"),
           ("peak_in_flight", "peak in flight"), ("p50_latency_ms", "p50 ms"),
           ("client_cpu_ms", "client cpu ms/chunk"), ("cpu_ms", "all cpu ms/chunk"),
           ("status", "job")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--sqlite", action="store_true")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--env", action="append", default=[], metavar="DOCQ_X=V",
                        help="a setting for docqueue's workers in every scenario (repeatable)")
    args = parser.parse_args()
    wanted = args.only.split(",")
    rows: list[dict[str, Any]] = []
    for sc in [s for s in SCENARIOS if s.name in wanted]:
        docs, prompt = corpus(sc.docs, seed=3)
        charge = prompt + MAX_TOKENS
        load = os.getloadavg()[0]
        print(f"[{sc.name}] {len(docs)} documents, {charge} tokens charged per call; "
              f"load {load:.2f}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="docq-bench-limit-") as tmp:
            run = run_docqueue(sc, docs, args, Path(tmp))
        rows.append(figures(sc, run, charge) | {"load": load})
        print(table(rows[-1:], COLUMNS), file=sys.stderr)
        if sc.peer and not args.no_peer:
            run = run_the_peer(sc, docs, charge)
            rows.append(figures(sc, run, charge) | {"load": os.getloadavg()[0]})
            print(table(rows[-1:], COLUMNS), file=sys.stderr)
    print(table(rows, COLUMNS))
    path = write_json("limit", {"scenarios": rows})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
