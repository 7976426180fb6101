"""Benchmark tables in: peak RSS and wall time of `docq submit` of a 10^6-row Parquet file.

    python benchmarks/bench_tables.py [--rows 1000000] [--pg-url ...] [--redis-url ...]

Writes a Parquet file of --rows rows (id, text of about 20 words, two metadata columns: a team
and a priority) in row groups of 100,000 to a temporary folder, then runs `docq submit FILE
--text-column text --id-column id --json` as users do, in a child process against a fresh
PostgreSQL schema and this run's Redis DB, with no workers. The parent samples the child's RSS
every 50 ms (and reads its ru_maxrss at exit); the submit report is checked against the rows.

Target: peak RSS of the submitting process at most 300 MiB.

Prints a table and writes benchmarks/results/tables.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

TARGET_MIB = 300
SAMPLE_S = 0.05
ROW_GROUP = 100_000
MIB = 2**20


def write_table(path: Path, rows: int, seed: int = 11) -> int:
    """The benchmark's Parquet file, written a row group at a time; returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.harness import WORDS

    rng = random.Random(seed)
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("team", pa.string()),
                        ("priority", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            ids = range(start, min(rows, start + ROW_GROUP))
            writer.write_table(pa.table({
                "id": [f"T{i:08d}" for i in ids],
                "text": [f"Ticket {i}: " + " ".join(rng.choice(WORDS) for _ in range(18)) + "."
                         for i in ids],
                "team": [("red", "blue", "green", "amber")[i % 4] for i in ids],
                "priority": [i % 5 for i in ids]}, schema=schema))
    return path.stat().st_size


class Sampler(threading.Thread):
    """The child's RSS every SAMPLE_S seconds; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self.done.wait(SAMPLE_S)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from benchmarks.harness import check_redis, results_store

    client = check_redis(args.redis_url)
    path = workdir / "tickets.parquet"
    t = time.monotonic()
    size = write_table(path, args.rows)
    print(f"wrote {args.rows:,} rows, {size / MIB:,.0f} MiB, in {time.monotonic() - t:.0f}s",
          file=sys.stderr)
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {**os.environ, "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                   "DOCQ_LLM_BASE_URL": "http://127.0.0.1:9/v1", "DOCQ_LLM_MODEL": "bench",
                   "DOCQ_HOME": str(workdir / "home")}
            command = [sys.executable, "-m", "docqueue.tasks.cli", "submit", str(path),
                       "--text-column", "text", "--id-column", "id", "--json"]
            started = time.monotonic()
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            sampler = Sampler(proc.pid)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall_s = time.monotonic() - started
            sampler.done.set()
            sampler.join()
            assert proc.stdout is not None and proc.stderr is not None
            out, err = proc.stdout.read(), proc.stderr.read()
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"the submit failed: {err.strip()}")
            report = json.loads(out)
    finally:
        client.flushdb()
    peak = max(sampler.peak, usage.ru_maxrss * 1024)
    return {"rows": args.rows, "file_mib": round(size / MIB, 1),
            "accepted": report["documents_accepted"], "rejected": report["documents_rejected"],
            "chunks": report["chunks"], "batches": report["batches"],
            "wall_s": round(wall_s, 1), "rows_per_s": round(args.rows / wall_s),
            "peak_rss_mib": round(peak / MIB, 1), "target_met": peak / MIB <= TARGET_MIB}


COLUMNS = [("rows", "rows"), ("file_mib", "file MiB"), ("accepted", "accepted"),
           ("rejected", "rejected"), ("chunks", "chunks"), ("batches", "batches"),
           ("wall_s", "wall s"), ("rows_per_s", "rows/s"), ("peak_rss_mib", "peak RSS MiB"),
           ("target_met", "<= 300 MiB")]


def main() -> None:
    from benchmarks.harness import DEFAULT_PG_URL, machine, table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--json-name", default="tables")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-tables-"))
    try:
        row = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table([row], COLUMNS))
    print(f"target: peak RSS of submit <= {TARGET_MIB} MiB "
          f"({'met' if row['target_met'] else 'NOT met'}); {machine()}")
    path = write_json(args.json_name, {"target_mib": TARGET_MIB, "runs": [row]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
