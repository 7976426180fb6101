"""Benchmark docqueue's own overhead: whole jobs against a simulator that costs nothing.

    python benchmarks/bench_overhead.py [--chunks 20000] [--runs 1] [--profile]

The provider simulator answers at once (no latency, no limits). The corpus is --chunks documents
of about 200 tokens, one chunk each, summarized in chat mode. Two worker processes (one
`celery -A docqueue.tasks worker --concurrency 2`, prefork) do the work; the results store is a
fresh PostgreSQL schema in database `test`, the broker Redis DB 13.

Beside each docqueue run, on the same simulator, a minimal asyncio client (aiohttp, 256 requests
in flight, another process) sends the same requests as fast as it can: the ceiling of this
machine for that work. The figure to watch is docqueue's chunks per second from the start of
`submit` to the merged job, as a share of that ceiling (target >= 0.5). Everything (simulator,
Redis, PostgreSQL, workers, client) shares this machine's cores; the CPU time each part used is
reported per 1,000 chunks. With --profile, py-spy samples the two worker processes during the
run and writes flame graphs to benchmarks/results/.

Prints a table and writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

from benchmarks.harness import (
    DEFAULT_PG_URL,
    RESULTS_DIR,
    WORDS,
    CpuMeter,
    check_redis,
    results_store,
    servers,
    start_worker,
    table,
    wait_for_job,
    write_json,
)
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.testing.simulator.process import SimulatorProcess

MAX_TOKENS = 256  # docqueue's default DOCQ_LLM_MAX_TOKENS; the simulator answers ~60 tokens
CEILING_INFLIGHT = 256
TARGET_SHARE = 0.5


def corpus(n: int, seed: int) -> Iterator[tuple[str, str]]:
    """n documents of about 200 tokens (190 common words and a header)."""
    rng = random.Random(seed)
    for i in range(n):
        yield f"doc-{i}", f"Report {seed}-{i}: " + " ".join(rng.choices(WORDS, k=190)) + "."


def request_bodies(n: int, seed: int) -> Iterator[bytes]:
    """The chat requests docqueue sends for the same corpus, as JSON bodies."""
    pipe = build_pipeline("summarize", {})
    for _, text in corpus(n, seed):
        prompt = pipe.render(text, "chat")
        yield json.dumps({"model": "docq-sim", "messages": prompt.messages,
                          "max_tokens": MAX_TOKENS, "temperature": 0.0}).encode()


async def _ceiling(url: str, n: int, seed: int) -> dict[str, Any]:
    import aiohttp

    bodies = list(request_bodies(n, seed))
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    failures = 0
    connector = aiohttp.TCPConnector(limit=CEILING_INFLIGHT)
    headers = {"content-type": "application/json", "authorization": "Bearer no-key"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal failures
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(f"{url}/chat/completions", data=body,
                                        headers=headers) as resp:
                    reply = await resp.json()
                    if resp.status != 200 or not reply["choices"][0]["message"]["content"]:
                        failures += 1

        started = time.perf_counter()
        cpu = time.process_time()
        await asyncio.gather(*(client() for _ in range(CEILING_INFLIGHT)))
        wall = time.perf_counter() - started
    return {"requests": n, "failures": failures, "wall_s": wall,
            "requests_per_s": n / wall, "client_cpu_s": time.process_time() - cpu}


STACKS = ("aiohttp", "httpx", "openai-sdk", "docqueue-llm")
STACK_INFLIGHT = 25  # one batch's calls, as a worker process makes them


async def _stack(url: str, n: int, stack: str) -> dict[str, Any]:
    """CPU per call of one client stack, STACK_INFLIGHT calls at a time, in this process."""
    import aiohttp
    import httpx

    from docqueue.workers.provider.client import EndpointConfig, OpenAICompatibleLLM

    pipe = build_pipeline("summarize", {})
    prompts = [pipe.render(text, "chat") for _, text in corpus(n, 5)]
    llm = OpenAICompatibleLLM(EndpointConfig(
        base_url=url, model="docq-sim", mode="chat", api_key=None, timeout_s=60,
        temperature=0.0, max_connections=64))
    plain = httpx.AsyncClient(limits=httpx.Limits(max_connections=64))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    sdk = llm._chat.async_client  # the openai SDK's chat.completions under langchain-openai

    async def call(prompt: Any) -> None:
        body = {"model": "docq-sim", "messages": prompt.messages, "max_tokens": MAX_TOKENS}
        if stack == "aiohttp":
            async with session.post(f"{url}/chat/completions", json=body) as resp:
                await resp.json()
        elif stack == "httpx":
            (await plain.post(f"{url}/chat/completions", json=body)).json()
        elif stack == "openai-sdk":
            await sdk.create(**body)
        else:
            await llm.complete(prompt, max_tokens=MAX_TOKENS)

    gate = asyncio.Semaphore(STACK_INFLIGHT)

    async def one(prompt: Any) -> None:
        async with gate:
            await call(prompt)

    for prompt in prompts[:50]:  # warm up connections and caches
        await one(prompt)
    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    cpu_ms = (time.process_time() - cpu) * 1000 / n
    await llm.aclose()
    await plain.aclose()
    await session.close()
    return {"stack": stack, "calls": n, "cpu_ms_per_call": cpu_ms, "calls_per_s": n / wall}


def run_stacks(sim: SimulatorProcess, n: int) -> list[dict[str, Any]]:
    """Each client stack in its own process, one after the other, on the same simulator."""
    rows = []
    for stack in STACKS:
        out = subprocess.run([sys.executable, __file__, "--stack-child", sim.url, str(n), stack],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def run_ceiling(sim: SimulatorProcess, n: int, seed: int) -> dict[str, Any]:
    """The minimal client in its own process, so it competes for the cores as the workers do."""
    out = subprocess.run([sys.executable, __file__, "--ceiling-child", sim.url, str(n), str(seed)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_docqueue(args: argparse.Namespace, sim: SimulatorProcess, workdir: Path, seed: int,
                 tag: str) -> dict[str, Any]:
    from docqueue.tasks import submit
    from docqueue.tasks.runtime import reset_runtime

    admin = check_redis(args.redis_url)
    with results_store(args.pg_url, False, workdir) as db_url:
        env = {
            "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
            "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim", "DOCQ_LLM_MODE": "chat",
            "DOCQ_HOME": str(workdir / "home"), "DOCQ_LLM_MAX_TOKENS": str(MAX_TOKENS),
            "DOCQ_CHUNK_TOKENS": "400", "DOCQ_CHUNK_OVERLAP_TOKENS": "0",
            **dict(kv.split("=", 1) for kv in args.env),
        }
        for key in ("DOCQ_LLM_RPM", "DOCQ_LLM_TPM"):
            os.environ.pop(key, None)
        os.environ.update(env)
        reset_runtime()
        workers = [start_worker(env, workdir / f"worker-{tag}-{i}.log", f"overhead{tag}-{i}",
                                args.concurrency, pool=args.pool) for i in range(args.workers)]
        try:
            for worker in workers:
                worker.wait_ready()
            mains = [psutil.Process(w.proc.pid) for w in workers]
            # The children import the model client and build their clients after "ready":
            # that start-up is not per-chunk work, and must not be measured as such.
            settle(lambda: [*mains, *(c for m in mains for c in m.children(True))])
            children = [c for m in mains for c in m.children(recursive=True)]
            meter = CpuMeter({
                "workers": lambda: [*mains, *(c for m in mains for c in m.children(True))],
                "worker main": lambda: mains,
                "simulator": lambda: [psutil.Process(sim.pid)],
                "redis": lambda: servers("redis-server"), "postgres": lambda: servers("postgres"),
                "submit+poll": lambda: [psutil.Process()],
            })
            profilers = _start_profilers(children or mains, tag) if args.profile else []
            before = sim.stats()["requests_total"]
            load = os.getloadavg()[0]
            meter.start()
            t0 = time.perf_counter()
            handle = submit(corpus(args.chunks, seed), "summarize", name=f"overhead-{tag}")
            t_published = time.perf_counter()
            wait_for_job(handle.id, args.timeout_s, workers[0].log_path)
            wall = time.perf_counter() - t0
            cpu = meter.stop()
            for p in profilers:  # py-spy writes its profile when interrupted
                p.send_signal(signal.SIGINT)
                p.wait(60)
            st = handle.status()
            calls = sim.stats()["requests_total"] - before
        finally:
            for worker in workers:
                worker.stop()
            admin.flushdb()
            admin.close()
            reset_runtime()
    chunks = st["chunks_total"]
    return {
        "run": tag, "chunks": chunks, "job": st["status"], "ok": st["chunks_by_state"].get("ok", 0),
        "model_calls": calls, "wall_s": wall, "submit_s": t_published - t0,
        "chunks_per_s": chunks / wall, "load_before": load,
        "cpu_ms_per_chunk": {k: round(v * 1000 / chunks, 3) for k, v in cpu.items()},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
    }


def settle(procs: Callable[[], list[psutil.Process]], quiet_s: float = 1.0,
           timeout_s: float = 60.0) -> None:
    """Wait until `procs()` use under 5% of a core over `quiet_s` (their start-up is over)."""
    deadline = time.monotonic() + timeout_s
    time.sleep(1.0)
    before = _cpu_s(procs())
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = _cpu_s(procs())
        if now - before < 0.05 * quiet_s:
            return
        before = now
    print(f"warning: the workers were still busy {timeout_s:g} s after start", file=sys.stderr)


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _start_profilers(children: list[psutil.Process], tag: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on each worker child until the child is stopped or 120 s pass."""
    spy = Path(sys.executable).with_name("py-spy")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen([str(spy), "record", "--pid", str(c.pid), "--rate", "200",
                          "--duration", "120", "--nonblocking", "--format", "raw",
                          "--output", str(RESULTS_DIR / f"overhead-{tag}-child{i}.folded")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, c in enumerate(children)
    ]


COLUMNS = [
    ("run", "run"), ("chunks", "chunks"), ("wall_s", "wall s"), ("chunks_per_s", "chunks/s"),
    ("ceiling_per_s", "ceiling req/s"), ("share", "share"), ("model_calls", "calls"),
    ("job", "job"), ("cpu_workers", "worker cpu ms/chunk"), ("cpu_main", "of it main"),
    ("cpu_simulator", "sim"),
    ("cpu_redis", "redis"), ("cpu_postgres", "pg"), ("cpu_submit", "submit"),
    ("load_before", "load"),
]


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--ceiling-child":
        url, n, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(asyncio.run(_ceiling(url, n, seed))))
        return
    if len(sys.argv) == 5 and sys.argv[1] == "--stack-child":
        print(json.dumps(asyncio.run(_stack(sys.argv[2], int(sys.argv[3]), sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=1, help="docqueue runs (each between two "
                        "ceiling runs)")
    parser.add_argument("--workers", type=int, default=1, help="`celery worker` processes (1)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="pool processes (or threads) per worker (2)")
    parser.add_argument("--pool", default="prefork", help="Celery pool (prefork)")
    parser.add_argument("--env", action="append", default=[], metavar="DOCQ_X=V",
                        help="extra settings for the run")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker children")
    parser.add_argument("--stack-calls", type=int, default=3000,
                        help="calls per client stack in the CPU-per-call comparison (0: skip)")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="keep the worker logs")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json-name", default="overhead", help="benchmarks/results/NAME.json")
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    ceilings: list[dict[str, Any]] = []
    sim = SimulatorProcess("--seed", "7").start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
            if args.keep:
                tmp = tempfile.mkdtemp(prefix="bench-overhead-logs-")
                print(f"worker logs kept in {tmp}", file=sys.stderr)
            ceilings.append(run_ceiling(sim, args.chunks, seed=1))
            for i in range(args.runs):
                row = run_docqueue(args, sim, Path(tmp), seed=100 + i, tag=str(i + 1))
                ceilings.append(run_ceiling(sim, args.chunks, seed=2 + i))
                around = [c["requests_per_s"] for c in ceilings[-2:]]
                row["ceiling_per_s"] = statistics.mean(around)
                row["share"] = row["chunks_per_s"] / row["ceiling_per_s"]
                cpu = row["cpu_ms_per_chunk"]
                row.update(cpu_workers=cpu["workers"], cpu_main=cpu["worker main"],
                           cpu_simulator=cpu["simulator"],
                           cpu_redis=cpu["redis"], cpu_postgres=cpu["postgres"],
                           cpu_submit=cpu["submit+poll"])
                rows.append(row)
                print(f"[{row['run']}] {row['chunks_per_s']:.0f} chunks/s, ceiling "
                      f"{row['ceiling_per_s']:.0f} req/s: {row['share']:.2f}", file=sys.stderr)
            stacks = run_stacks(sim, args.stack_calls) if args.stack_calls else []
    finally:
        sim.stop()
    print(table(rows, COLUMNS))
    if stacks:
        print("\nclient stack alone, 25 calls in flight in one process (CPU ms per call):")
        print(table(stacks, [("stack", "stack"), ("cpu_ms_per_call", "cpu ms/call"),
                             ("calls_per_s", "calls/s")]))
    print("ceiling runs (req/s): " + ", ".join(f"{c['requests_per_s']:.0f}" for c in ceilings))
    print(f"target: chunks/s >= {TARGET_SHARE} x ceiling; cpu columns are ms per chunk")
    path = write_json(args.json_name, {
        "corpus": {"chunks": args.chunks, "tokens_per_chunk": "about 200",
                   "max_tokens": MAX_TOKENS},
        "workers": {"celery_workers": args.workers, "concurrency": args.concurrency,
                    "pool": args.pool, "env": args.env},
        "target_share": TARGET_SHARE, "ceilings": ceilings, "runs": rows,
        "client_stacks": stacks,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
