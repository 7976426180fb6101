"""Benchmark the global rate limit end to end: how close whole jobs run to the provider's budget.

    python benchmarks/bench_ratelimit.py [--minutes 4] [--sqlite]

The provider simulator runs at --rpm 1200 --tpm 120000 --latency-ms 100; two
`celery -A docqueue.tasks worker` processes with 2 children each (4 processes) share one limiter in
Redis DB 14; the results store is a fresh PostgreSQL schema in database `test` on
127.0.0.1:5432 (dropped afterwards), or a SQLite file with --sqlite. The corpus is one chunk per
document, every chunk the same size, so each call costs the same: the provider charges
prompt + max_tokens (100) at admission, and the corpus is sized to need the first full bucket
plus --minutes of refill at the token limit (TPM binds; RPM does not).

Two runs: "configured" (DOCQ_LLM_RPM/TPM set to the provider's limits) and "learned" (unset:
learned from the x-ratelimit-* headers). Each reports, over the steady part (the first and the
last 20 s left out), the tokens admitted per minute (the provider's charge, derived from the
admitted requests x the known charge per call, and checked against the simulator's total) and
the tokens served (prompt + real completion) as shares of the TPM limit; requests per minute
against the RPM limit; 429s as a share of all requests; and the time from submit to the first
result row. Prints a table and writes benchmarks/results/ratelimit.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory comes first on sys.path, and the editable install then
# finds `tasks` as a bare namespace (no `submit`): put the project root first.
sys.path.insert(0, str(ROOT))

from benchmarks.harness import (
    DEFAULT_PG_URL,
    check_redis,
    one_chunk_corpus,
    results_store,
    start_worker,
    write_json,
)
from benchmarks.harness import table as render_table
from docqueue.models import Result
from docqueue.tasks.worker_process import WorkerProcess
from docqueue.workers.testing.simulator.process import SimulatorProcess

RPM, TPM, LATENCY_MS = 1200, 120_000, 100
CHUNK_TOKENS, MAX_TOKENS = 150, 100
EDGE_S = 20  # left out at both ends of a run
TARGETS = {"admitted_share": 0.95, "rate_limited_share": 0.01, "first_result_s": 2.0}


def corpus(n: int, seed: int) -> tuple[list[tuple[str, str]], int]:
    """n documents of exactly CHUNK_TOKENS - 1 tokens (one chunk each, all the same charge)
    and the prompt tokens of each call."""
    return one_chunk_corpus(n, seed, CHUNK_TOKENS - 2, "Report", "doc")


def run(name: str, limits_known: bool, args: argparse.Namespace, workdir: Path,
        docs: list[tuple[str, str]], charge: int) -> dict[str, Any]:
    from docqueue.models import FINAL_JOB_STATES as TERMINAL
    from docqueue.tasks import submit
    from docqueue.tasks.api import job_status
    from docqueue.tasks.limits import limiter_status
    from docqueue.tasks.runtime import reset_runtime, runtime

    admin = check_redis(args.redis_url)
    sim = SimulatorProcess("--rpm", str(RPM), "--tpm", str(TPM), "--latency-ms",
                           str(LATENCY_MS), "--seed", "7").start()
    workers: list[WorkerProcess] = []
    try:
        with results_store(args.pg_url, args.sqlite, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / "home"),
                "DOCQ_LLM_MAX_TOKENS": str(MAX_TOKENS), "DOCQ_CHUNK_TOKENS": str(CHUNK_TOKENS),
                "DOCQ_CHUNK_OVERLAP_TOKENS": "0",
            }
            for key in ("DOCQ_LLM_RPM", "DOCQ_LLM_TPM"):
                os.environ.pop(key, None)
            if limits_known:
                env |= {"DOCQ_LLM_RPM": str(RPM), "DOCQ_LLM_TPM": str(TPM)}
            os.environ.update(env)
            reset_runtime()
            for i in range(args.workers):
                workers.append(start_worker(env, workdir / f"{name}-w{i}.log", f"{name}{i}",
                                            args.concurrency))
            for w in workers:
                w.wait_ready()
            load_before = os.getloadavg()
            print(f"[{name}] {len(docs)} documents, {len(workers)} x {args.concurrency} worker "
                  f"processes; load {load_before[0]:.2f}", file=sys.stderr)
            t_submit = time.time()
            handle = submit(docs, "summarize", name=f"bench-{name}")
            t_published = time.time()
            first_row_s: float | None = None
            snapshot: dict[str, Any] = {}
            while True:
                if first_row_s is None:
                    first_row_s = _first_row_at(handle.id)
                st = job_status(handle.id)
                if st["status"] in TERMINAL:
                    break
                if not snapshot or time.time() - snapshot.get("_at", 0) > 10:
                    snapshot = {**limiter_status(runtime().settings), "_at": time.time()}
                    print(f"[{name}] {st['chunks_done']}/{st['chunks_total']} chunks, "
                          f"{time.time() - t_submit:.0f}s", file=sys.stderr)
                time.sleep(0.5 if first_row_s is None else 2.0)
            t_done = time.time()
            stats = sim.stats()
            final_limiter = limiter_status(runtime().settings)
            load_after = os.getloadavg()
            st = job_status(handle.id)
    finally:
        for w in workers:
            w.stop()
        sim.stop()
        admin.flushdb()
        admin.close()
    return figures(name, limits_known, stats, charge, len(docs), st, final_limiter,
                   first_row_s, t_submit, t_published, t_done, load_before, load_after)


def _first_row_at(job_id: int) -> float | None:
    from docqueue.tasks.runtime import runtime

    with runtime().sessions() as s:
        first = s.scalar(select(func.min(Result.updated_at)).where(Result.job_id == job_id))
    return None if first is None else first.timestamp()


def figures(name: str, limits_known: bool, stats: dict[str, Any], charge: int, chunks: int,
            job: dict[str, Any], limiter: dict[str, Any], first_row_at: float | None,
            t_submit: float, t_published: float, t_done: float,
            load_before: tuple[float, ...], load_after: tuple[float, ...]) -> dict[str, Any]:
    series = {s["t"]: s for s in stats["per_second"]}
    active = [t for t, s in series.items() if s["requests"]]
    start, end = min(active), max(active)
    window = range(start + EDGE_S, end - EDGE_S + 1)
    if len(window) < 10:
        raise SystemExit(f"[{name}] the run lasted {end - start + 1}s: too short for a steady "
                         f"part once {EDGE_S}s are left out at each end; use a larger --minutes")
    per_min = 60 / len(window)

    def total(field: str) -> int:
        return sum(series[t][field] for t in window if t in series)

    admitted_requests = total("requests") - total("429")
    by_status = stats["by_status"]
    rate_limited = int(by_status.get("429", 0))
    return {
        "run": name,
        "limits": "configured" if limits_known else "learned from headers",
        "chunks": chunks,
        "charge_per_call": charge,
        "job_status": job["status"],
        "job_wall_s": round(t_done - t_submit, 1),
        "busy_s": end - start + 1,
        "steady_window_s": len(window),
        "admitted_tpm": round(admitted_requests * charge * per_min),
        "admitted_share": round(admitted_requests * charge * per_min / TPM, 4),
        "served_tpm": round(total("tokens") * per_min),
        "served_share": round(total("tokens") * per_min / TPM, 4),
        "rpm": round(admitted_requests * per_min, 1),
        "rpm_share": round(admitted_requests * per_min / RPM, 4),
        "requests": stats["requests_total"],
        "rate_limited": rate_limited,
        "rate_limited_share": round(rate_limited / max(1, stats["requests_total"]), 5),
        "by_status": by_status,
        "tokens_admitted_total": stats["tokens_admitted"],
        "tokens_admitted_check": stats["tokens_admitted"] == (
            stats["requests_total"] - rate_limited) * charge,
        "submit_s": round(t_published - t_submit, 2),
        "first_result_s": None if first_row_at is None else round(first_row_at - t_submit, 2),
        "first_result_after_publish_s": (
            None if first_row_at is None else round(first_row_at - t_published, 2)),
        "limiter_after": {k: limiter.get(k) for k in ("requests", "tokens", "cool_down_s")},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
    }


COLUMNS = [
    ("run", "run"), ("limits", "limits"), ("admitted_share", "admitted/TPM"),
    ("served_share", "served/TPM"), ("admitted_tpm", "admitted tpm"), ("served_tpm", "served tpm"),
    ("rpm", "rpm"), ("rpm_share", "rpm/RPM"), ("rate_limited_share", "429 share"),
    ("rate_limited", "429s"), ("requests", "requests"), ("first_result_s", "1st result s"),
    ("first_result_after_publish_s", "after publish s"), ("job_wall_s", "wall s"),
    ("job_status", "job"),
]


def table(rows: list[dict[str, Any]]) -> str:
    return render_table(rows, COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="minutes of work at the token limit beyond the first full bucket "
                             "(default 4; 1 for a smoke run)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PG")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--concurrency", type=int, default=2, help="children per worker (2)")
    parser.add_argument("--only", choices=["configured", "learned"], help="run one of the two")
    args = parser.parse_args()
    if not args.minutes > 0:
        parser.error(f"--minutes must be a number > 0, got {args.minutes}")

    docs, prompt = corpus(1, seed=0)
    charge = prompt + MAX_TOKENS
    n = math.ceil(TPM * (1 + args.minutes) / charge)
    plan = [("configured", True), ("learned", False)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp:
        for i, (name, known) in enumerate(plan):
            if args.only and name != args.only:
                continue
            docs, prompt = corpus(n, seed=100 + i)  # other texts: no response-cache hits
            rows.append(run(name, known, args, Path(tmp), docs, prompt + MAX_TOKENS))
    print(table(rows))
    print(f"targets: admitted/TPM >= {TARGETS['admitted_share']}, 429 share <= "
          f"{TARGETS['rate_limited_share']}, first result <= {TARGETS['first_result_s']} s")
    path = write_json("ratelimit", {
        "simulator": {"rpm": RPM, "tpm": TPM, "latency_ms": LATENCY_MS},
        "corpus": {"chunks": n, "chunk_tokens": CHUNK_TOKENS - 1, "prompt_tokens": prompt,
                   "max_tokens": MAX_TOKENS, "charge_per_call": charge,
                   "minutes_at_limit": args.minutes},
        "workers": {"processes": args.workers, "concurrency": args.concurrency},
        "store": "sqlite" if args.sqlite else "postgresql",
        "steady_edges_s": EDGE_S,
        "targets": TARGETS,
        "runs": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
