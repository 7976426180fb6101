"""Benchmark the global limiter: acquire + settle operations per second from N processes.

    python benchmarks/bench_limiter.py [--redis-url redis://127.0.0.1:6379/14] [--seconds 3]

Each process runs 32 coroutines that loop `acquire(100 tokens)` then `settle(100)` with no
model call in between, against a local Redis. Scenarios:
  unlimited      no rate limits, only the in-flight cap: the pure cost of the limiter
  limits_unhit   RPM/TPM set far above what is reached: the bucket arithmetic on every call
  at_limit       a 1-second bucket of 40,000 tokens (400 calls/s): everyone waits their turn;
                 reports how much of the allowed budget was used and the Redis calls per op
Throughput is also counted per 0.5 s slice to show the noise (min / median / max).
Prints a table and writes benchmarks/results/limiter.json. Bounded: under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

from docqueue.workers.provider.admission import Limits
from docqueue.workers.provider.limiter import Limiter

RESULTS = Path(__file__).resolve().parent / "results" / "limiter.json"
COROUTINES = 32
TOKENS = 100
SLICE_S = 0.5
SCENARIOS: dict[str, dict[str, Any]] = {
    "unlimited": {"rpm": None, "tpm": None, "max_inflight": 100_000, "period_s": 60.0},
    "limits_unhit": {"rpm": 10**9, "tpm": 10**12, "max_inflight": 100_000, "period_s": 60.0},
    "at_limit": {"rpm": 10**9, "tpm": 40_000, "max_inflight": 100_000, "period_s": 1.0},
}
PLAN = [("unlimited", 1), ("unlimited", 2), ("unlimited", 4), ("limits_unhit", 1),
        ("limits_unhit", 4), ("at_limit", 1), ("at_limit", 4)]


def worker(url: str, scope: str, limits: dict[str, Any], seconds: float, barrier: Any,
           results: Any) -> None:
    results.put(asyncio.run(_worker(url, scope, limits, seconds, barrier)))


async def _worker(url: str, scope: str, limits: dict[str, Any], seconds: float,
                  barrier: Any) -> dict[str, Any]:
    client = Redis.from_url(url)
    limiter = Limiter(client, scope, Limits(**limits), slot_ttl_s=30)
    await client.ping()
    barrier.wait(timeout=60)
    start = time.monotonic()
    end = start + seconds
    done: list[float] = []
    waits: list[float] = []

    async def loop() -> None:
        while time.monotonic() < end:
            asked = time.monotonic()
            ticket = await limiter.acquire(TOKENS, max_wait_s=30)
            waits.append(time.monotonic() - asked)
            await limiter.settle(ticket, TOKENS)
            done.append(time.monotonic())

    await asyncio.gather(*(loop() for _ in range(COROUTINES)))
    await client.aclose()
    return {"start": start, "done": done, "waits": waits}


def run_one(url: str, scenario: str, processes: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    scope = f"bench:lim:{uuid.uuid4().hex[:8]}"
    limits = SCENARIOS[scenario]
    admin = redis.Redis.from_url(url)
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, scope, limits, seconds, barrier, results))
             for _ in range(processes)]
    calls_before = _evalsha_calls(admin)
    for proc in procs:
        proc.start()
    outs = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    calls = _evalsha_calls(admin) - calls_before
    admin.delete(f"{{{scope}}}:state", f"{{{scope}}}:slots", f"{{{scope}}}:out")
    admin.close()

    start = min(o["start"] for o in outs)
    done = sorted(t - start for o in outs for t in o["done"])
    waits = sorted(w for o in outs for w in o["waits"])
    ops = len(done)
    elapsed = max(done[-1], seconds) if done else seconds
    slices = [0] * int(seconds / SLICE_S)
    for t in done:
        if t < len(slices) * SLICE_S:
            slices[int(t / SLICE_S)] += 1
    per_s = [n / SLICE_S for n in slices]
    row: dict[str, Any] = {
        "scenario": scenario,
        "processes": processes,
        "coroutines": processes * COROUTINES,
        "ops": ops,
        "ops_per_s": round(ops / elapsed, 1),
        "ops_per_s_min": round(min(per_s), 1),
        "ops_per_s_median": round(statistics.median(per_s), 1),
        "ops_per_s_max": round(max(per_s), 1),
        "acquire_p50_ms": round(1000 * waits[len(waits) // 2], 2),
        "acquire_p99_ms": round(1000 * waits[int(len(waits) * 0.99)], 2),
        "redis_calls_per_op": round(calls / max(ops, 1), 2),
    }
    if scenario == "at_limit":
        # The bucket starts full (one period's worth) and refills at tpm per period.
        allowed = (limits["tpm"] + limits["tpm"] * elapsed / limits["period_s"]) / TOKENS
        row["allowed_ops"] = int(allowed)
        row["budget_used"] = round(ops / allowed, 3)
    return row


def _evalsha_calls(admin: redis.Redis) -> int:
    stats: dict[str, Any] = admin.info("commandstats")  # type: ignore[assignment]
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    args = parser.parse_args()
    admin = redis.Redis.from_url(args.redis_url)
    server = admin.info("server")
    admin.close()

    rows = [run_one(args.redis_url, scenario, n, args.seconds) for scenario, n in PLAN]
    columns = ["scenario", "processes", "coroutines", "ops_per_s", "ops_per_s_min",
               "ops_per_s_median", "ops_per_s_max", "acquire_p50_ms", "acquire_p99_ms",
               "redis_calls_per_op", "budget_used"]
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "redis": server.get("redis_version"),
        },
        "seconds_per_run": args.seconds,
        "tokens_per_call": TOKENS,
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
