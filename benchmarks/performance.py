"""Run the four performance benchmarks one after the other and print their targets side by side.

    python benchmarks/performance.py [--quick]

1. overhead (bench_overhead.py): chunks/s of whole jobs against a zero-latency simulator, as a
   share of a minimal asyncio client's requests/s on the same simulator (target >= 0.5);
2. latency (bench_latency.py): calls in flight against a 2 s simulator, as a share of the global
   in-flight cap of 256 (target >= 0.9);
3. producer (bench_producer.py): peak RSS of `submit` for 1,000,000 chunks (target <= 300 MiB);
4. store (bench_store.py): result-row upserts per second (target >= 5,000) and the merge of a
   100,000-chunk job (target <= 30 s).

Each benchmark prints its own table and writes its JSON in benchmarks/results/; this script then
prints the summary and writes benchmarks/results/performance.json. They run one at a time: each
needs the machine to itself. --quick runs them at a tenth of their size (a smoke run: its
figures are not the targets' figures). Needs Redis on 127.0.0.1:6379 (DBs 12-13) and
PostgreSQL on 127.0.0.1:5432 (database `test`), as the tests do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

from benchmarks.harness import RESULTS_DIR, machine, table, write_json

FULL = {
    "overhead": ["--chunks", "20000", "--runs", "2"],
    "latency": ["--chunks", "4000", "--runs", "2"],
    "producer": ["--documents", "50000", "--variants", "generated"],
    "store": ["--chunks", "100000"],
}
QUICK = {
    "overhead": ["--chunks", "2000", "--stack-calls", "500"],
    "latency": ["--chunks", "800"],
    "producer": ["--documents", "5000", "--variants", "generated"],
    "store": ["--chunks", "10000", "--repeats", "1"],
}


def spread(values: list[float], fmt: str) -> str:
    """min / median / max, or the one value."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return format(ordered[0], fmt)
    mid = ordered[len(ordered) // 2] if len(ordered) % 2 else (
        (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2)
    return " / ".join(format(v, fmt) for v in (ordered[0], mid, ordered[-1]))


def summary(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if "overhead" in results:
        runs = results["overhead"]["runs"]
        shares = [r["share"] for r in runs]
        rows.append({
            "benchmark": "overhead: chunks/s over the minimal client's req/s",
            "measured": spread(shares, ".3f") + " (" + ", ".join(
                f"{r['chunks_per_s']:.0f} of {r['ceiling_per_s']:.0f}" for r in runs) + ")",
            "target": ">= 0.5", "met": "yes" if min(shares) >= 0.5 else "NO",
        })
    if "latency" in results:
        for layout in dict.fromkeys(r["layout"] for r in results["latency"]["runs"]):
            runs = [r for r in results["latency"]["runs"] if r["layout"] == layout]
            shares = [r["share_of_cap"] for r in runs]
            rows.append({
                "benchmark": f"latency: in flight over the cap of {runs[0]['cap']}, {layout}",
                "measured": spread(shares, ".3f") + " (" + ", ".join(
                    f"{r['in_flight_mean']:.0f}" for r in runs) + " in flight)",
                "target": ">= 0.9", "met": "yes" if min(shares) >= 0.9 else "NO",
            })
    if "producer" in results:
        for r in results["producer"]["runs"]:
            rows.append({
                "benchmark": f"producer: peak RSS of submit, {r['chunks']:,} chunks "
                             f"({r['variant']})",
                "measured": f"{r['peak_rss_mib']:.0f} MiB; dispatch {r['dispatch_s']:.0f} s; "
                            f"Redis +{r['redis_delta_mib']:.0f} MiB",
                "target": "<= 300 MiB", "met": "yes" if r["peak_rss_mib"] <= 300 else "NO",
            })
    if "store" in results:
        for s in results["store"]["scenarios"]:
            name = s["scenario"] + (f", {s['flush']}-row flushes" if s["flush"] else "")
            unit = "rows/s" if s["unit"] == "rows/s" else "s"
            fmt = ",.0f" if unit == "rows/s" else ".1f"
            rows.append({
                "benchmark": f"store: {name}",
                "measured": spread([s["min"], s["median"], s["max"]], fmt) + f" {unit}",
                "target": s["target"], "met": s["met"],
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the size: a smoke run")
    parser.add_argument("--only", action="append", choices=list(FULL),
                        help="run only these (repeatable)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for name, extra in plan.items():
        if args.only and name not in args.only:
            continue
        json_name = f"{name}-quick" if args.quick else name
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), *extra]
        cmd += ["--json-name", json_name]
        print(f"\n== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        subprocess.run(cmd, check=True, cwd=ROOT)
        timings[name] = round(time.monotonic() - started, 1)
        results[name] = json.loads((RESULTS_DIR / f"{json_name}.json").read_text())
    rows = summary(results)
    print("\n" + table(rows, [("benchmark", "benchmark"), ("measured", "measured"),
                              ("target", "target"), ("met", "met")]))
    print(f"machine: {machine()}")
    path = write_json("performance-quick" if args.quick else "performance",
                      {"summary": rows, "seconds": timings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
