"""Benchmark chunks sized to the model's context against 400-token chunks: calls, tokens, time.

    python benchmarks/bench_reduce.py [--documents 10000] [--redis-url redis://127.0.0.1:6379/13]

The corpus is --documents documents of mixed lengths (seeded): 60% of 50 to 400 words, 30% of
400 to 1,500 and 10% of 1,500 to 6,000. Each row runs the whole corpus as one summarize job
(chat mode, the response cache off) through two worker processes and the provider simulator,
which answers at once (no latency, no limits):

- `400-token chunks`: DOCQ_CHUNK_TOKENS=400 (the old default), overlap 40;
- `context 2,048`: the chunk size docqueue picks for a 2,048-token window (the local model's);
- `context 128,000`: the chunk size it picks for gpt-4o-mini's window (the simulator's default).

Every row has the reduce stage: a document of more than one chunk gets one summary, made by
reduce calls. Map and reduce calls are counted from the store, tokens billed are the
simulator's usage (prompt + completion) summed over the job's results, and the time runs from
`submit` to the merged job. Everything shares this machine's cores; the load is printed.

Prints a table and writes benchmarks/results/reduce.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

from benchmarks.harness import (
    DEFAULT_PG_URL,
    WORDS,
    check_redis,
    results_store,
    start_worker,
    table,
    wait_for_job,
    write_json,
)
from docqueue.workers.testing.simulator.process import SimulatorProcess

LENGTHS = ((0.6, 50, 400), (0.3, 400, 1_500), (0.1, 1_500, 6_000))  # share, words from, to
ROWS: tuple[tuple[str, dict[str, str]], ...] = (
    ("400-token chunks", {"DOCQ_CHUNK_TOKENS": "400"}),
    ("context 2,048", {"DOCQ_LLM_CONTEXT_TOKENS": "2048"}),
    ("context 128,000", {"DOCQ_LLM_CONTEXT_TOKENS": "128000"}),
)


def corpus(n: int, seed: int) -> Iterator[tuple[str, str]]:
    """n documents of mixed lengths, every sentence numbered so no two chunks are alike."""
    rng = random.Random(seed)
    for i in range(n):
        pick = rng.random()
        for share, low, high in LENGTHS:  # noqa: B007 - read after the loop breaks
            if pick < share:
                break
            pick -= share
        words = rng.randint(low, high)
        sentences = []
        for s in range(0, words, 12):
            sentences.append(f"Item {i}.{s}: " + " ".join(rng.choices(WORDS, k=10)) + ".")
        yield f"doc-{i}", " ".join(sentences)


def run_row(args: argparse.Namespace, sim: SimulatorProcess, workdir: Path, name: str,
            overrides: dict[str, str]) -> dict[str, Any]:
    from sqlalchemy import func, select

    from docqueue.models import Chunk, Result
    from docqueue.tasks import submit
    from docqueue.tasks.runtime import reset_runtime, runtime

    admin = check_redis(args.redis_url)
    with results_store(args.pg_url, False, workdir) as db_url:
        env = {
            "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
            "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim", "DOCQ_LLM_MODE": "chat",
            "DOCQ_HOME": str(workdir / "home"), "DOCQ_CHUNK_OVERLAP_TOKENS": "40", **overrides,
        }
        for key in ("DOCQ_LLM_RPM", "DOCQ_LLM_TPM", "DOCQ_CHUNK_TOKENS",
                    "DOCQ_LLM_CONTEXT_TOKENS"):
            os.environ.pop(key, None)
        os.environ.update(env)
        reset_runtime()
        tag = name.split()[0].replace(",", "")
        workers = [start_worker(env, workdir / f"worker-{tag}-{i}.log", f"reduce{tag}-{i}", 2)
                   for i in range(2)]
        try:
            for worker in workers:
                worker.wait_ready()
            before = sim.stats()["requests_total"]
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            handle = submit(corpus(args.documents, args.seed), "summarize", cache="off",
                            name=f"reduce-{tag}")
            wait_for_job(handle.id, args.timeout_s, workers[0].log_path)
            wall = time.perf_counter() - t0
            st = handle.status()
            calls = sim.stats()["requests_total"] - before
            with runtime().sessions() as s:
                per_level: dict[bool, int] = {False: 0, True: 0}
                for level, n in s.execute(
                        select(Chunk.level, func.count()).select_from(Chunk)
                        .where(Chunk.job_id == handle.id).group_by(Chunk.level)):
                    per_level[level > 0] += n
                billed = s.scalar(select(func.sum(Result.tokens_in + Result.tokens_out))
                                  .where(Result.job_id == handle.id))
                one_call = s.scalar(select(func.count()).select_from(Chunk).where(
                    Chunk.job_id == handle.id, Chunk.level == 0, Chunk.seq == 1))
        finally:
            for worker in workers:
                worker.stop()
            admin.flushdb()
            admin.close()
            reset_runtime()
    documents = args.documents
    return {
        "row": name, "job": st["status"], "documents": documents,
        "one_call_documents": documents - int(one_call or 0),
        "map_calls": per_level[False], "reduce_calls": per_level[True],
        "calls": calls, "tokens_in": st["tokens_in"], "tokens_out": st["tokens_out"],
        "tokens_billed": int(billed or 0), "wall_s": round(wall, 1), "load_before": load,
    }


COLUMNS = (("row", "chunks"), ("documents", "documents"),
           ("one_call_documents", "one-call docs"), ("map_calls", "map calls"),
           ("reduce_calls", "reduce calls"), ("calls", "provider calls"),
           ("tokens_in", "tokens in"), ("tokens_out", "tokens out"),
           ("tokens_billed", "tokens billed"), ("wall_s", "time s"), ("load_before", "load"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--documents", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    p.add_argument("--timeout-s", type=float, default=3600)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="docq-bench-reduce-") as tmp, SimulatorProcess(
            "--seed", str(args.seed)) as sim:
        for name, overrides in ROWS:
            rows.append(run_row(args, sim, Path(tmp), name, overrides))
            print(table(rows[-1:], COLUMNS), flush=True)
    print()
    print(table(rows, COLUMNS))
    path = write_json("reduce", {"documents": args.documents, "lengths": LENGTHS, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
