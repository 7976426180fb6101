"""Benchmark the producer: memory and time of `submit` for a large corpus, and what it costs Redis.

    python benchmarks/bench_producer.py [--documents 50000] [--variants generated,files]

The corpus is --documents documents of exactly --chunks-per-doc chunks (20) at
DOCQ_CHUNK_TOKENS=100 with no overlap: each document is 20 paragraphs of about 70 tokens, so the
chunker cuts at every paragraph break, and 50,000 documents make 1,000,000 chunks (checked against
the submit report). The `generated` variant passes a generator of (id, text) pairs, built lazily
inside the child from a small pool of paragraphs; the `files` variant writes the same documents as
.txt files (1,000 to a folder) and submits the directory, as users do.

`submit` runs in a child process (`python -c`) against a fresh PostgreSQL schema and this run's
Redis DB, with no workers. The parent samples the child's RSS every 50 ms; the child reports when
its imports, the ingest and the publish begin and end, so every phase gets its own peak. Redis is
read before and after: `INFO memory`, `MEMORY USAGE` of the queue and of the chord keys, the number
of messages and the size of one. The DB is flushed and the schema dropped afterwards.

Target: peak RSS of `submit` at most 300 MiB for 1,000,000 chunks.

--profile tracemalloc (slow: use a small --documents) prints, for the ingest and the publish,
the top allocation sites at the highest traced memory seen; --profile pyinstrument writes a time
profile of `submit` (main thread) to benchmarks/results/producer-<variant>-pyinstrument.txt.

Prints a table and writes benchmarks/results/producer.json.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project, not this folder, comes first

TARGET_MIB = 300
SAMPLE_S = 0.05
CHUNK_TOKENS = 100
PARAGRAPH_POOL = 997  # distinct paragraphs the corpus is drawn from (a prime: varied documents)
FILES_PER_DIR = 1000
QUEUE = "celery"
MIB = 2**20

# A paragraph is five sentences of 13 common words and a full stop: about 70 tokens, so one
# paragraph fits a 100-token chunk, two do not, and the cut falls on the paragraph break.
_WORDS = (  # split where used
    "the of and to in is was for on that with as by at from his her are be this which or an "
    "have had not but were all they one their has been more when who will would there also "
    "its after first two new other some time only into than most over such them can these "
    "many then may about any made may out said well work year years part where between both "
    "under while during each same since long early later because small number large city "
    "state people world water house river north south school system group music power area"
)


def paragraphs(seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    words = _WORDS.split()
    return [
        " ".join(
            " ".join(rng.choice(words) for _ in range(13)).capitalize() + "." for _ in range(5)
        )
        for _ in range(PARAGRAPH_POOL)
    ]


def document(pool: list[str], n: int, chunks: int) -> str:
    """Document `n`: its number first (every text differs), then `chunks` pool paragraphs."""
    picks = [pool[(n * 31 + i * 17) % len(pool)] for i in range(chunks)]
    picks[0] = f"Document {n}. {picks[0]}"
    return "\n\n".join(picks)


def generated(documents: int, chunks: int) -> Iterator[tuple[str, str]]:
    pool = paragraphs()
    for n in range(documents):
        yield f"doc-{n:07d}", document(pool, n, chunks)


def write_files(root: Path, documents: int, chunks: int) -> int:
    """The corpus as .txt files under `root`, FILES_PER_DIR to a folder; returns bytes written."""
    total = 0
    for external_id, text in generated(documents, chunks):
        n = int(external_id.split("-")[1])
        folder = root / f"{n // FILES_PER_DIR:04d}"
        if n % FILES_PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        (folder / f"{external_id}.txt").write_bytes(data)
        total += len(data)
    return total


# -- the child: runs `submit` and says when each phase starts and ends ----------------------------

def child(spec_json: str) -> None:
    """Run in the child process: import, then submit the corpus, reporting events on stdout."""
    spec = json.loads(spec_json)
    import resource

    import psutil

    me = psutil.Process()

    def event(name: str, **extra: Any) -> None:
        line = {"event": name, "t": time.time(), "rss": me.memory_info().rss, **extra}
        print(json.dumps(line), flush=True)

    import importlib

    from docqueue.tasks import api

    # publish loads these anyway, so they belong in the baseline
    for module in ("docqueue.tasks.batches", "docqueue.tasks.jobs"):
        importlib.import_module(module)

    event("imported")
    tracing = spec["profile"] == "tracemalloc"
    watcher = _PeakSnapshots() if tracing else None

    def phase(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            event(f"{name}_start")
            if watcher is not None:
                watcher.begin(name)
            out = fn(*args, **kwargs)
            event(f"{name}_end")
            return out

        return wrapped

    for name, attr in (("ingest", "ingest"), ("publish", "publish"),
                       ("forget", "forget_chord_results")):
        setattr(api, attr, phase(name, getattr(api, attr)))
    if spec["variant"] == "files":
        sources: Any = spec["path"]
    else:
        sources = generated(spec["documents"], spec["chunks_per_doc"])
    profiler = None
    if spec["profile"] == "pyinstrument":
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    handle = api.submit(sources, "summarize", name="bench-producer")
    event("submitted")
    if profiler is not None:
        profiler.stop()
        Path(spec["profile_out"]).write_text(profiler.output_text(unicode=True, color=False))
    report = handle.report.as_dict() if handle.report else {}
    report.pop("rejected", None)
    if watcher is not None:
        watcher.report()
    event("done", report=report,
          ru_maxrss_self=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class _PeakSnapshots(threading.Thread):
    """Under tracemalloc: the snapshot at the highest traced memory seen in each phase."""

    def __init__(self) -> None:
        import tracemalloc

        super().__init__(daemon=True)
        tracemalloc.start(12)
        self.phase = ""
        self.best: dict[str, tuple[int, Any]] = {}
        self.stopped = threading.Event()
        self.start()

    def begin(self, name: str) -> None:
        self.phase = name

    def run(self) -> None:
        import tracemalloc

        while not self.stopped.wait(0.25):
            now = tracemalloc.get_traced_memory()[0]
            if self.phase and now > self.best.get(self.phase, (0, None))[0]:
                self.best[self.phase] = (now, tracemalloc.take_snapshot())

    def report(self) -> None:
        self.stopped.set()
        self.join()
        for name, (size, snap) in self.best.items():
            print(f"## tracemalloc {name}: {size / MIB:.1f} MiB traced at its peak; top 12 sites "
                  "(innermost frame first):", file=sys.stderr)
            for stat in snap.statistics("traceback")[:12]:
                frames = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                                     for f in list(stat.traceback)[::-1][:6])
                print(f"  {stat.size / MIB:8.1f} MiB {stat.count:9,d}  {frames}", file=sys.stderr)


# -- the parent ----------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """The child's RSS every SAMPLE_S seconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                self.samples.append((time.time(), self.proc.memory_info().rss))
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            time.sleep(SAMPLE_S)


def redis_figures(client: Any) -> dict[str, Any]:
    """What the job's messages and chord hold in Redis: per kind of key, count and bytes."""
    kinds: dict[str, dict[str, int]] = {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        if name == QUEUE:
            kind = "queue"
        elif name.endswith((".s", ".j", ".t")) and "-" in name:
            kind = "chord" + name[-2:]
        elif name.startswith("celery-task-meta-"):
            kind = "task-meta"
        elif name.startswith("_kombu"):
            kind = "kombu"
        elif name.startswith("docq:"):
            kind = "docq"
        else:
            kind = "other:" + name[:40]
        k = kinds.setdefault(kind, {"keys": 0, "bytes": 0})
        k["keys"] += 1
        k["bytes"] += client.memory_usage(name, samples=0) or 0
    first = client.lindex(QUEUE, 0)
    return {
        "used_memory": int(client.info("memory")["used_memory"]),
        "messages": int(client.llen(QUEUE)),
        "message_bytes": len(first) if first is not None else 0,
        "keys": kinds,
    }


def run(args: argparse.Namespace, variant: str, workdir: Path) -> dict[str, Any]:
    from benchmarks.harness import check_redis, results_store

    client = check_redis(args.redis_url)
    spec: dict[str, Any] = {"variant": variant, "documents": args.documents,
                            "chunks_per_doc": args.chunks_per_doc, "profile": args.profile,
                            "profile_out": str(ROOT / "benchmarks" / "results"
                                               / f"producer-{variant}-pyinstrument.txt")}
    corpus_bytes = None
    if variant == "files":
        spec["path"] = str(workdir / "corpus")
        t = time.monotonic()
        corpus_bytes = write_files(Path(spec["path"]), args.documents, args.chunks_per_doc)
        print(f"files: wrote {corpus_bytes / MIB:,.0f} MiB in {time.monotonic() - t:.0f}s",
              file=sys.stderr)
    before = int(client.info("memory")["used_memory"])
    load_before = round(os.getloadavg()[0], 2)
    try:
        with results_store(args.pg_url, False, workdir) as db_url:
            env = {**os.environ, "DOCQ_DATABASE_URL": db_url, "DOCQ_BROKER_URL": args.redis_url,
                   "DOCQ_LLM_BASE_URL": "http://127.0.0.1:9/v1", "DOCQ_LLM_MODEL": "bench",
                   "DOCQ_HOME": str(workdir / "home"), "DOCQ_CHUNK_TOKENS": str(CHUNK_TOKENS),
                   "DOCQ_CHUNK_OVERLAP_TOKENS": "0"}
            code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                    "from benchmarks.bench_producer import child; child(sys.argv[2])")
            started = time.time()
            proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), json.dumps(spec)],
                                    cwd=workdir, env=env, stdout=subprocess.PIPE, text=True)
            sampler = Sampler(proc.pid)
            sampler.start()
            events: dict[str, dict[str, Any]] = {}
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{"):
                    ev = json.loads(line)
                    events[ev["event"]] = ev
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            sampler.done.set()
            sampler.join()
            if proc.returncode != 0 or "done" not in events:
                raise SystemExit(f"the submit child failed ({proc.returncode})")
            after = redis_figures(client)
    finally:
        client.flushdb()
    return summarize(args, variant, started, events, sampler.samples, usage.ru_maxrss * 1024,
                     before, after, load_before, corpus_bytes)


def summarize(args: argparse.Namespace, variant: str, started: float,
              events: dict[str, dict[str, Any]], samples: list[tuple[float, int]],
              ru_maxrss: int, redis_before: int, redis_after: dict[str, Any],
              load_before: float, corpus_bytes: int | None) -> dict[str, Any]:
    def peak(start: str, end: str) -> float:
        t0, t1 = events[start]["t"], events[end]["t"]
        inside = [rss for t, rss in samples if t0 <= t <= t1]
        inside += [events[start]["rss"], events[end]["rss"]]
        return max(inside) / MIB

    report = events["done"]["report"]
    expected = args.documents * args.chunks_per_doc
    if report.get("chunks") != expected:
        raise SystemExit(f"the corpus made {report.get('chunks')} chunks, not {expected}")
    ingest_s = events["ingest_end"]["t"] - events["ingest_start"]["t"]
    publish_s = events["publish_end"]["t"] - events["publish_start"]["t"]
    dispatch_s = events["submitted"]["t"] - events["imported"]["t"]
    keys = redis_after["keys"]
    chord_bytes = sum(v["bytes"] for k, v in keys.items() if k.startswith("chord"))
    peak_rss = max([rss for _, rss in samples] + [e["rss"] for e in events.values()]) / MIB
    return {
        "variant": variant, "documents": args.documents, "chunks": report["chunks"],
        "batches": report["batches"],
        "baseline_mib": events["imported"]["rss"] / MIB,
        "peak_rss_mib": peak_rss,
        "ru_maxrss_mib": ru_maxrss / MIB,
        "ingest_peak_mib": peak("ingest_start", "ingest_end"),
        "publish_peak_mib": peak("publish_start", "publish_end"),
        "startup_s": events["imported"]["t"] - started,
        "ingest_s": ingest_s, "publish_s": publish_s, "dispatch_s": dispatch_s,
        "chunks_per_s": report["chunks"] / dispatch_s,
        "redis_before_mib": redis_before / MIB,
        "redis_after_mib": redis_after["used_memory"] / MIB,
        "redis_delta_mib": (redis_after["used_memory"] - redis_before) / MIB,
        "messages": redis_after["messages"], "message_bytes": redis_after["message_bytes"],
        "queue_mib": keys.get("queue", {}).get("bytes", 0) / MIB,
        "chord_keys": sum(v["keys"] for k, v in keys.items() if k.startswith("chord")),
        "chord_bytes": chord_bytes, "redis_keys": keys,
        "samples": len(samples), "corpus_mib": corpus_bytes / MIB if corpus_bytes else None,
        "target_met": peak_rss <= TARGET_MIB, "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
    }


COLUMNS = [
    ("variant", "variant"), ("chunks", "chunks"), ("batches", "batches"),
    ("baseline_mib", "base MiB"), ("peak_rss_mib", "peak MiB"), ("ru_maxrss_mib", "maxrss MiB"),
    ("ingest_peak_mib", "ingest pk"), ("publish_peak_mib", "publish pk"),
    ("ingest_s", "ingest s"), ("publish_s", "publish s"), ("dispatch_s", "dispatch s"),
    ("chunks_per_s", "chunks/s"), ("messages", "msgs"), ("message_bytes", "msg B"),
    ("queue_mib", "queue MiB"), ("chord_keys", "chord keys"), ("chord_bytes", "chord B"),
    ("redis_delta_mib", "redis +MiB"), ("load_before", "load"), ("load_after", "load after"),
]


def main() -> None:
    from benchmarks.harness import DEFAULT_PG_URL, machine, table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--chunks-per-doc", type=int, default=20)
    parser.add_argument("--variants", default="generated,files",
                        help="comma-separated: generated, files")
    parser.add_argument("--profile", choices=["none", "tracemalloc", "pyinstrument"],
                        default="none")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--json-name", default="producer")
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        workdir = Path(tempfile.mkdtemp(prefix="bench-producer-"))
        try:
            rows.append(run(args, variant, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows, COLUMNS))
    print(f"target: peak RSS of submit <= {TARGET_MIB} MiB "
          f"({'met' if all(r['target_met'] for r in rows) else 'NOT met'}); {machine()}")
    path = write_json(args.json_name, {"target_mib": TARGET_MIB, "chunk_tokens": CHUNK_TOKENS,
                                       "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
