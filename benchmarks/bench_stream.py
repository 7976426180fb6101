"""Benchmark streaming submission: how soon the first model call comes after `docq submit` starts.

    python benchmarks/bench_stream.py [--documents 20000] [--before a6aebcd] \
        [--redis-url redis://127.0.0.1:6379/3] [--pg-url postgresql://postgres@127.0.0.1/db]

For each variant, a JSONL file of --documents one-chunk documents is submitted with `docq submit
FILE --json` (a child process, CLI start-up included) to a fresh PostgreSQL schema, a running
`docq worker` (two processes, the default layout) and the provider simulator at zero latency,
recording every request. Measured: from the moment the child is started to the simulator's first
request and to the child's exit (submit's return), the child's peak RSS (sampled every 50 ms),
and the time to the job's final state.

Variants: `after` is this checkout. `before` runs the submit of the commit --before (the code
before streaming submission: it recorded the whole corpus, then published) from a `git
archive` of it, against the same workers (this checkout's) and the same migrated store; omit it
with --variants after.

Prints a table and writes benchmarks/results/stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

from benchmarks.harness import (
    check_redis,
    results_store,
    start_worker,
    table,
    wait_for_job,
    write_json,
)
from docqueue.workers.testing.simulator.process import SimulatorProcess

SAMPLE_S = 0.05
CLI = "import sys; from docqueue.tasks.cli import main; sys.argv[0] = 'docq'; sys.exit(main())"


class RssSampler(threading.Thread):
    """The peak RSS of a process, sampled every SAMPLE_S seconds until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0

    def run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(SAMPLE_S)


def write_corpus(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"d{i}", "text": f"Barge {i} moored at berth "
                                  f"{i * 7 % 613} with {i % 30 + 2} tons of grain."}) + "\n")


def before_tree(commit: str, workdir: Path) -> Path:
    """A package root whose `docqueue` is the code of `commit` (models, tasks, workers)."""
    src = workdir / "before-src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = workdir / "before-pkg" / "docqueue"
    pkg.mkdir(parents=True)
    for name in ("__init__.py", "py.typed"):
        (pkg / name).write_bytes((src / "docqueue" / name).read_bytes())
    for sub in ("models", "tasks", "workers"):
        (pkg / sub).symlink_to(src / sub)
    return pkg.parent


def run(variant: str, args: argparse.Namespace, workdir: Path, corpus: Path,
        before: Path | None) -> dict[str, Any]:
    from docqueue.tasks.runtime import reset_runtime

    check_redis(args.redis_url)
    sim = SimulatorProcess("--latency-ms", "0", "--seed", "7", "--record-requests").start()
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {
                "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                "DOCQ_LLM_BASE_URL": sim.url, "DOCQ_LLM_MODEL": "docq-sim",
                "DOCQ_LLM_MODE": "chat", "DOCQ_HOME": str(workdir / "home"),
            }
            os.environ.update(env)
            reset_runtime()
            worker = start_worker(env, workdir / f"worker-{variant}.log", variant, 2,
                                  pool="default")
            try:
                worker.wait_ready()
                time.sleep(1.0)
                load = os.getloadavg()[0]
                child_env = {**os.environ, **env}
                # `python -c` puts its directory first on sys.path: the package root to run
                cwd = ROOT
                if variant == "before":
                    assert before is not None
                    child_env["PYTHONPATH"] = str(before)
                    cwd = before
                t0 = time.time()
                proc = subprocess.Popen([sys.executable, "-c", CLI, "submit", str(corpus),
                                         "--json"], env=child_env, cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                sampler = RssSampler(proc.pid)
                sampler.start()
                out, err = proc.communicate(timeout=args.timeout_s)
                returned = time.time()
                if proc.returncode != 0:
                    raise SystemExit(f"{variant}: submit failed: {err.decode()[-2000:]}")
                job_id = json.loads(out)["job_id"]
                wait_for_job(job_id, args.timeout_s, worker.log_path)
                final = time.time()
                streamed = _streamed(job_id)
                sampler.join(timeout=1)
            finally:
                worker.stop()
            requests = sim.requests()
    finally:
        sim.stop()
    first = min(r["start"] for r in requests)
    return {
        "variant": variant, "streamed": streamed, "documents": args.documents,
        "requests": len(requests),
        "first_call_s": round(first - t0, 3), "submit_s": round(returned - t0, 3),
        "first_before_return": first < returned, "final_s": round(final - t0, 2),
        "submit_peak_rss_mib": round(sampler.peak / 2**20, 1), "load_at_start": round(load, 2),
    }


def _streamed(job_id: int) -> bool:
    """Whether the submit that recorded the job streamed it: only that code stamps
    `ingested_at` (a check that each variant ran the code it names)."""
    from sqlalchemy import select

    from docqueue.models import Job
    from docqueue.tasks.runtime import runtime

    with runtime().sessions() as s:
        return s.scalar(select(Job.ingested_at).where(Job.id == job_id)) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--before", default="a6aebcd", help="the commit before streaming")
    parser.add_argument("--redis-url", default=os.environ.get("DOCQ_BENCH_REDIS_URL",
                                                              "redis://127.0.0.1:6379/3"))
    parser.add_argument("--pg-url", default=os.environ.get(
        "DOCQ_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test_stream"))
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        workdir = Path(tmp)
        corpus = workdir / "corpus.jsonl"
        write_corpus(corpus, args.documents)
        variants = args.variants.split(",")
        before = before_tree(args.before, workdir) if "before" in variants else None
        for variant in variants:
            rows.append(run(variant, args, workdir, corpus, before))
            print(table(rows[-1:], [("variant", "variant"), ("first_call_s", "first call s")]),
                  flush=True)
    print(table(rows, [("variant", "variant"), ("streamed", "streamed"), ("documents", "docs"),
                       ("requests", "requests"),
                       ("first_call_s", "first call s"), ("submit_s", "submit returns s"),
                       ("first_before_return", "first<return"), ("final_s", "final s"),
                       ("submit_peak_rss_mib", "submit peak MiB"), ("load_at_start", "load")]))
    print(f"written: {write_json('stream', {'rows': rows})}")


if __name__ == "__main__":
    main()
