"""What recording one model call costs the hot path: `workers.metrics.model_call` (a counter,
the duration histogram, two token histograms and the cost counter), in memory and in
prometheus_client's multiprocess files, as a prefork worker's pool processes record them.

    python benchmarks/bench_metrics.py [--calls 20000] [--repeats 5]

Prints a table (the median of the repeats, in microseconds per call) and writes
benchmarks/results/metrics.json. Bounded: a few seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project root first (see bench_store.py)

from benchmarks.harness import table, write_json
from docqueue.tasks.exporter import use_files
from docqueue.workers import metrics


def per_call_us(calls: int, model: str) -> float:
    """Microseconds per recorded call; `model` picks fresh labelled values for each mode."""
    started = time.perf_counter()
    for _ in range(calls):
        metrics.model_call(endpoint="127.0.0.1:8000", model=model, operation="chat",
                           seconds=0.5, exc=None, tokens_in=400, tokens_out=60, cost=0.0001)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    metrics.current_pipeline.set("summarize")
    rows = [{"mode": "in memory", "us": statistics.median(
        per_call_us(args.calls, "bench-memory") for _ in range(args.repeats))}]
    with tempfile.TemporaryDirectory() as files:
        use_files(Path(files))  # from here on, new labelled values live in mmap'd files
        rows.append({"mode": "multiprocess files", "us": statistics.median(
            per_call_us(args.calls, "bench-files") for _ in range(args.repeats))})
    for row in rows:
        row["us"] = round(row["us"], 2)
    print(table(rows, [("mode", "recording"), ("us", "µs per model call (median)")]))
    path = write_json("metrics", {"calls": args.calls, "repeats": args.repeats, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
