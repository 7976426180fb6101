"""Benchmark the provider simulator: throughput, latency, limiter accuracy and memory.

    python benchmarks/bench_simulator.py [--quick]

The server runs in its own process (SimulatorProcess) on loopback; this process is the client
(aiohttp). Scenarios:
  chat, completions, json_schema  zero latency, no limits: requests/s, p50/p99, errors
  rpm_steady                      --rpm 1200 under overload: admitted requests/s once the
                                  bucket is drained (should be 20/s)
  memory                          server RSS idle vs with 2,000 requests held open
Prints a table and writes benchmarks/results/simulator.json. Bounded: about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from docqueue.workers.testing.simulator.process import SimulatorProcess

RESULTS = Path(__file__).resolve().parent / "results" / "simulator.json"
MODEL = "docq-sim"
PROMPT = (
    "Summarize the following section of the annual report in two sentences. Revenue grew by "
    "twelve percent while costs stayed flat, and the team expects the same next year."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "figures": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "value": {"type": "number"}},
                "required": ["name", "value"],
            },
            "maxItems": 4,
        },
    },
    "required": ["title", "sentiment", "figures"],
}


@dataclass
class Throughput:
    scenario: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float
    # Server CPU per request, and what one fully used core would sustain at that cost: a
    # figure that other load on a shared machine does not distort as much as requests/s.
    server_cpu_ms_per_request: float
    core_capacity_per_s: float
    statuses: dict[str, int]


def body_for(scenario: str, i: int) -> dict[str, Any]:
    if scenario == "completions":
        return {"model": MODEL, "prompt": f"{PROMPT} ({i})", "max_tokens": 128}
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a careful analyst."},
            {"role": "user", "content": f"{PROMPT} ({i})"},
        ],
        "max_tokens": 128,
        "temperature": 0,
    }
    if scenario == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "summary", "schema": SCHEMA},
        }
    return body


async def hammer(
    url: str, scenario: str, concurrency: int, duration_s: float
) -> tuple[list[float], dict[str, int], float]:
    """Send requests from `concurrency` workers for `duration_s`; latencies in seconds."""
    path = "/completions" if scenario == "completions" else "/chat/completions"
    payloads = [json.dumps(body_for(scenario, i)).encode() for i in range(512)]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    headers = {"content-type": "application/json", "authorization": "Bearer x"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker(k: int) -> None:
            n = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(
                        url + path, data=payloads[n % len(payloads)], headers=headers
                    ) as resp:
                        await resp.read()
                        key = str(resp.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = type(exc).__name__
                latencies.append(time.perf_counter() - t0)
                statuses[key] = statuses.get(key, 0) + 1
                n += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, statuses, elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_throughput(scenario: str, concurrency: int, duration_s: float) -> Throughput:
    with SimulatorProcess("--seed", "1") as sim:
        server = psutil.Process(sim.pid)
        asyncio.run(hammer(sim.url, scenario, concurrency, 1.0))  # warm-up
        cpu_before = sum(server.cpu_times()[:2])
        latencies, statuses, elapsed = asyncio.run(
            hammer(sim.url, scenario, concurrency, duration_s)
        )
        cpu_s = sum(server.cpu_times()[:2]) - cpu_before
    errors = sum(n for k, n in statuses.items() if k != "200")
    return Throughput(
        scenario=scenario,
        concurrency=concurrency,
        duration_s=round(elapsed, 2),
        requests=len(latencies),
        errors=errors,
        requests_per_s=round(len(latencies) / elapsed, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        server_cpu_s=round(cpu_s, 2),
        server_cpu_ms_per_request=round(cpu_s * 1000 / max(1, len(latencies)), 3),
        core_capacity_per_s=round(len(latencies) / cpu_s) if cpu_s else 0.0,
        statuses=statuses,
    )


def run_rpm_steady(duration_s: float) -> dict[str, Any]:
    """Overload a 1,200 RPM budget; after the initial burst, admissions must run at 20/s."""
    with SimulatorProcess("--rpm", "1200", "--seed", "1") as sim:
        _, statuses, _ = asyncio.run(hammer(sim.url, "chat", 32, duration_s))
        series = sim.stats()["per_second"]
    drained = [s for s in series if s["429"] > 0]
    steady = drained[1:-1]  # whole seconds after the bucket first ran dry
    ok_per_s = statistics.mean(s["ok"] for s in steady) if steady else float("nan")
    return {
        "limit_rpm": 1200,
        "expected_steady_ok_per_s": 20.0,
        "steady_ok_per_s": round(ok_per_s, 1),
        "steady_seconds": len(steady),
        "statuses": statuses,
    }


async def hold_open(url: str, count: int) -> list[asyncio.Task[Any]]:
    connector = aiohttp.TCPConnector(limit=count)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
    body = json.dumps(body_for("chat", 0)).encode()

    async def one() -> None:
        headers = {"content-type": "application/json"}
        async with session.post(url + "/chat/completions", data=body, headers=headers) as r:
            await r.read()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    tasks.append(asyncio.create_task(_close_later(session, tasks)))
    return tasks


async def _close_later(session: aiohttp.ClientSession, tasks: list[asyncio.Task[Any]]) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        for task in tasks[:-1]:
            task.cancel()
        await asyncio.gather(*tasks[:-1], return_exceptions=True)
        await session.close()


def run_memory(count: int) -> dict[str, Any]:
    """Server RSS idle, then with `count` requests held open by a long latency."""
    with SimulatorProcess("--latency-ms", "30000") as sim:
        server = psutil.Process(sim.pid)
        idle_mib = server.memory_info().rss / 2**20

        async def measure() -> tuple[float, int, float]:
            started = time.perf_counter()
            tasks = await hold_open(sim.url, count)
            in_flight = 0
            while time.perf_counter() - started < 25:
                await asyncio.sleep(0.25)
                in_flight = (await asyncio.to_thread(sim.stats))["in_flight"]
                if in_flight >= count:
                    break
            opened_s = time.perf_counter() - started
            rss = server.memory_info().rss / 2**20
            tasks[-1].cancel()
            await asyncio.gather(tasks[-1], return_exceptions=True)
            return rss, in_flight, opened_s

        loaded_mib, in_flight, opened_s = asyncio.run(measure())
    return {
        "held_requests": in_flight,
        "seconds_to_open": round(opened_s, 2),
        "idle_rss_mib": round(idle_mib, 1),
        "loaded_rss_mib": round(loaded_mib, 1),
        "per_request_kib": round((loaded_mib - idle_mib) * 1024 / max(1, in_flight), 1),
    }


def print_table(rows: list[Throughput], steady: dict[str, Any], memory: dict[str, Any]) -> None:
    head = f"{'scenario':<12} {'conc':>5} {'requests':>9} {'req/s':>8} {'p50 ms':>8} "
    head += f"{'p99 ms':>8} {'errors':>7} {'srv cpu ms/req':>14} {'req/s per core':>14}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.scenario:<12} {r.concurrency:>5} {r.requests:>9} {r.requests_per_s:>8.0f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>7} "
            f"{r.server_cpu_ms_per_request:>14.3f} {r.core_capacity_per_s:>14.0f}"
        )
    print()
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in psutil.getloadavg())}")
    print(
        f"rpm_steady: limit 1200 RPM -> {steady['steady_ok_per_s']} admitted/s "
        f"(expected 20.0) over {steady['steady_seconds']} s"
    )
    print(
        f"memory: idle {memory['idle_rss_mib']} MiB, {memory['held_requests']} held "
        f"{memory['loaded_rss_mib']} MiB ({memory['per_request_kib']} KiB/request)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 20 s)")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    duration_s = 3.0 if args.quick else 10.0
    rows = [
        run_throughput(scenario, args.concurrency, duration_s if scenario == "chat" else 5.0)
        for scenario in ("chat", "completions", "json_schema")
    ]
    steady = run_rpm_steady(5.0 if args.quick else 8.0)
    memory = run_memory(2000)
    print_table(rows, steady, memory)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": psutil.cpu_count(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "load_average_1_5_15": [round(x, 2) for x in psutil.getloadavg()],
        },
        "throughput": [asdict(r) for r in rows],
        "rpm_steady": steady,
        "memory": memory,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
