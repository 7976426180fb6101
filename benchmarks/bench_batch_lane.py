"""Benchmark the two lanes: the same corpus online and through the provider's Batch API.

    python benchmarks/bench_batch_lane.py [--chunks 20000] [--turnaround-s 2] [--file-requests 6000]

--chunks one-chunk documents (every chunk different, the cache off) against the simulator: once
online (one `docq worker` of --concurrency pool processes, the simulator answering at once) and
once with `--lane batch` (the same worker, `docq beat` polling every second, the simulator
finishing each provider batch --turnaround-s after its creation, files of at most
--file-requests requests). Both are priced by one table entry ($2 / $8 per million tokens in /
out; the batch lane at half). The wall time is from the submit to the merged job; the batch
lane's is set by the provider's turnaround in real use (up to 24 h), not by docqueue.

Prints a table and writes benchmarks/results/batch_lane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

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

PRICES = {"docq-sim": {"input_per_mtok": 2.0, "output_per_mtok": 8.0}}
COLUMNS = (("lane", "lane"), ("chunks", "chunks"), ("wall_s", "submit to merged s"),
           ("provider_batches", "provider batches"), ("tokens_in", "tokens in"),
           ("tokens_out", "tokens out"), ("cost", "cost $"), ("load", "load 1 min"))


def corpus(n: int) -> list[tuple[str, str]]:
    return [(f"doc-{i}", f"Barge {i} unloaded {i % 17 + 3} crates at pier {i * 31}.")
            for i in range(n)]


def run_lane(args: argparse.Namespace, workdir: Path, lane: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from docqueue.models import ProviderBatch
    from docqueue.tasks import submit
    from docqueue.tasks.api import job_status
    from docqueue.tasks.runtime import reset_runtime, runtime

    admin = check_redis(args.redis_url)
    sim = SimulatorProcess("--seed", "1", "--batch-turnaround-s", str(args.turnaround_s),
                           "--batch-max-requests", str(args.file_requests)).start()
    worker, beat = None, None
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / f"home-{lane}"),
                "DOCQ_PRICES": json.dumps(PRICES), "DOCQ_BATCH_POLL_S": "1",
                "DOCQ_BATCH_FILE_MAX_REQUESTS": str(args.file_requests),
            }
            os.environ.update(env)
            reset_runtime()
            worker = start_worker(env, workdir / f"w-{lane}.log", f"w-{lane}", args.concurrency)
            worker.wait_ready()
            if lane == "batch":
                beat = subprocess.Popen([str(Path(sys.executable).parent / "docq"), "beat"],
                                        env={**os.environ, **env},
                                        stdout=(workdir / "beat.log").open("wb"),
                                        stderr=subprocess.STDOUT)
            time.sleep(1.0)
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            handle = submit(corpus(args.chunks), "summarize", cache="off", lane=lane)
            wait_for_job(handle.id, args.timeout_s, workdir / f"w-{lane}.log", poll_s=0.2)
            wall = time.monotonic() - t0
            st = job_status(handle.id)
            with runtime().sessions() as s:
                provider_batches = s.scalar(select(func.count()).select_from(ProviderBatch)
                                            .where(ProviderBatch.job_id == handle.id))
    finally:
        if beat is not None:
            beat.terminate()
            beat.wait(20)
        if worker is not None:
            worker.stop()
        sim.stop()
        admin.flushdb()
        admin.close()
    return {"lane": lane, "chunks": st["chunks_total"], "status": st["status"],
            "wall_s": round(wall, 1), "provider_batches": provider_batches,
            "tokens_in": st["tokens_in"], "tokens_out": st["tokens_out"],
            "cost": round(st["cost"], 4), "load": round(load, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--turnaround-s", type=float, default=2.0)
    parser.add_argument("--file-requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="docq-bench-lane-") as tmp:
        rows = [run_lane(args, Path(tmp), lane) for lane in ("online", "batch")]
    print(table(rows, COLUMNS))
    path = write_json("batch_lane", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
