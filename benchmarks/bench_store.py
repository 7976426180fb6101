"""Benchmark the results store: bulk upserts of result rows, and the merge of a large job.

    python benchmarks/bench_store.py [--chunks 100000] [--chunks-per-doc 20] [--repeats 3]
                                     [--flush-rows 200,25]

Setup: a fresh PostgreSQL schema in database `test` on 127.0.0.1:5432 (dropped afterwards) and
one summarize job of --chunks chunks (documents of --chunks-per-doc chunks), written by the real
producer (`create_job` + `ingest`, default chunking settings); its time is reported, not judged.

Then, --repeats times (the machine is shared, so each figure is min / median / max):

- upsert, 1 writer and 2 writers: a result row for every chunk through `leases.record`, in
  flushes of --flush-rows rows, each flush its own transaction, as `ResultWriter` in
  workers/batch/writer.py does; each writer is its own process with its own engine. The results
  table is emptied before each of these passes. 200 rows is `FLUSH_ROWS`; but a `ResultWriter`
  belongs to one batch (at most `batch_max_chunks`, 25, rows), so 25 is the most a flush holds
  with the default settings, and both sizes are measured.
- rewrite: the same rows again with other outputs (a second delivery of every batch); the
  upsert must keep the final rows, and this pass checks that no output changed.
- merge (fresh, then again): `merging.merge_job` over the job, one transaction as the chord
  callback runs it; each run is checked against the statuses and counts the rows imply.

Rows are shaped by `leases.blank_result`: status ok with a summary of a few hundred characters,
tokens, latency and cost, and --error-share of error rows (every chunk of one document fails,
so all three document outcomes occur). Targets: >= 5,000 rows/s for each write pass, <= 30 s
for each merge. Prints a table and writes benchmarks/results/store.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text, update

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory comes first on sys.path, and the editable install then
# finds `tasks` as a bare namespace: put the project root first.
sys.path.insert(0, str(ROOT))

from benchmarks.harness import DEFAULT_PG_URL, WORDS, machine, results_store, write_json
from benchmarks.harness import table as render_table
from docqueue.models import Chunk, Document, DocumentStatus, Job, JobStatus, make_sessionmaker
from docqueue.workers.batch import leases
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.jobs.merging import merge_job
from docqueue.workers.jobs.submission import create_job, ingest, mark_submitted
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.settings import Settings

ROWS_PER_S_TARGET, MERGE_S_TARGET = 5_000.0, 30.0
PARAGRAPH_WORDS = 280  # a paragraph and the overlap fit in one 400-token chunk, two do not
REWRITE_MARK = "second delivery"
PRICE_IN, PRICE_OUT = 0.15, 0.60  # gpt-4o-mini, dollars per million tokens


@dataclass(frozen=True)
class Target:
    url: str
    job_id: int
    version: str


# -- setup: the producer path ------------------------------------------------------------------


def documents(n_docs: int, chunks_per_doc: int, seed: int) -> Iterator[SourceDocument]:
    """Prose of `chunks_per_doc` paragraphs per document: one chunk per paragraph."""
    rng = random.Random(seed)
    for d in range(n_docs):
        paragraphs = []
        for p in range(chunks_per_doc):
            words = rng.choices(WORDS, k=PARAGRAPH_WORDS)
            sentences = [" ".join(words[i:i + 14]).capitalize() + "."
                         for i in range(0, len(words), 14)]
            paragraphs.append(f"Part {p + 1} of report {d}. " + " ".join(sentences))
        body = "\n\n".join(paragraphs)
        yield SourceDocument(external_id=f"report-{d:06d}.txt", source="bench",
                             text=body, content_hash=None, size_bytes=len(body))


def produce(url: str, chunks: int, chunks_per_doc: int) -> tuple[Target, dict[str, Any]]:
    settings = Settings(_env_file=None, database_url=url)  # type: ignore[call-arg]
    sessions = make_sessionmaker(url)
    pipeline = build_pipeline("summarize", {})
    n_docs = -(-chunks // chunks_per_doc)
    t0 = time.perf_counter()
    with sessions.begin() as session:
        job_id = create_job(session, settings, pipeline, "bench-store").id
    report = ingest(sessions, settings, job_id, documents(n_docs, chunks_per_doc, seed=7))
    with sessions.begin() as session:
        mark_submitted(session, job_id)
    seconds = time.perf_counter() - t0
    sessions.kw["bind"].dispose()
    return Target(url, job_id, pipeline.version), {
        "documents": report.documents_accepted, "chunks": report.chunks,
        "batches": report.batches, "seconds": round(seconds, 2),
    }


# -- result rows ----------------------------------------------------------------------------------


def chunk_list(sessions: Any, job_id: int) -> list[tuple[int, int]]:
    with sessions.begin() as session:
        return [(r[0], r[1]) for r in session.execute(
            select(Chunk.id, Chunk.document_id).where(Chunk.job_id == job_id).order_by(Chunk.id)
        )]


def make_rows(target: Target, chunks: list[tuple[int, int]], error_share: float, seed: int,
              mark: str = "") -> list[dict[str, Any]]:
    """One result row per chunk, as `call_model` in workers/batch/calls.py shapes them."""
    rng = random.Random(seed)
    failing_doc = chunks[0][1]  # every chunk of the first document fails
    rows = []
    for chunk_id, document_id in chunks:
        row = leases.blank_result(chunk_id, target.job_id, document_id, attempts=1)
        if document_id == failing_doc or rng.random() < error_share:
            row.update(status="error", error_type="PermanentLLMError", http_status=400,
                       error_message="HTTP 400 context_length_exceeded: This model's maximum "
                                     "context length is 8192 tokens. " + mark)
        else:
            words = rng.choices(WORDS, k=rng.randint(35, 60))
            tin, tout = rng.randint(380, 460), rng.randint(50, 90)
            row.update(status="ok", finish_reason="stop", tokens_in=tin, tokens_out=tout,
                       latency_ms=round(rng.uniform(300, 3000), 2),
                       cost=(tin * PRICE_IN + tout * PRICE_OUT) / 1e6,
                       output={"summary": (mark + " " + " ".join(words)).strip().capitalize()
                               + "."})
        rows.append(row)
    return rows


def _writer(target: Target, chunks: list[tuple[int, int]], error_share: float, mark: str,
            flush_rows: int, part: int, parts: int, barrier: Barrier,
            out: Any) -> None:
    """One writer process: its share of the flushes, timed after every writer is ready."""
    sessions = make_sessionmaker(target.url)
    rows = make_rows(target, chunks, error_share, seed=11, mark=mark)
    flushes = [rows[i:i + flush_rows] for i in range(0, len(rows), flush_rows)][part::parts]
    with sessions.begin() as session:  # connect before the clock starts
        session.execute(text("SELECT 1"))
    barrier.wait()
    t0 = time.monotonic()
    for flush in flushes:
        with sessions.begin() as session:
            leases.record(session, target.version, flush)
    t1 = time.monotonic()
    out.put((t0, t1, sum(len(f) for f in flushes)))
    sessions.kw["bind"].dispose()


def write_pass(target: Target, chunks: list[tuple[int, int]], error_share: float,
               flush_rows: int, writers: int, mark: str = "") -> tuple[int, float]:
    """All rows through `writers` processes; (rows, wall seconds from first start to last end)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(target, chunks, error_share, mark, flush_rows,
                                               k, writers, barrier, out))
             for k in range(writers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a writer exited with {p.exitcode}")
    start, end = min(r[0] for r in results), max(r[1] for r in results)
    return sum(r[2] for r in results), end - start


# -- checks ---------------------------------------------------------------------------------------


def expected_outcome(rows: list[dict[str, Any]]) -> dict[str, Any]:
    per_doc: dict[int, Counter[str]] = {}
    for r in rows:
        per_doc.setdefault(r["document_id"], Counter())[r["status"]] += 1
    docs: Counter[str] = Counter()
    for states in per_doc.values():
        ok, total = states["ok"], sum(states.values())
        docs[DocumentStatus.OK if ok == total else DocumentStatus.PARTIAL if ok
             else DocumentStatus.ERROR] += 1
    ok = sum(1 for r in rows if r["status"] == "ok")
    return {"documents": dict(docs), "chunks_ok": ok, "chunks_error": len(rows) - ok,
            "status": JobStatus.PARTIAL,
            "tokens_in": sum(r["tokens_in"] for r in rows)}


def check_merge(sessions: Any, target: Target, expected: dict[str, Any]) -> list[str]:
    with sessions.begin() as session:
        docs = dict(session.execute(
            select(Document.status, func.count()).where(Document.job_id == target.job_id)
            .group_by(Document.status)).all())
        # The JSON column stores a merge's None as JSON null, not SQL NULL.
        merged = session.scalar(
            text("SELECT count(*) FROM documents WHERE job_id = :job AND output IS NOT NULL "
                 "AND output::text <> 'null'"), {"job": target.job_id})
        job = session.get(Job, target.job_id)
        assert job is not None
        got = {"documents": docs, "chunks_ok": job.chunks_ok, "chunks_error": job.chunks_error,
               "status": job.status, "tokens_in": job.tokens_in}
    problems = [f"{k}: expected {v}, got {got[k]}" for k, v in expected.items() if got[k] != v]
    with_output = sum(n for s, n in expected["documents"].items() if s != DocumentStatus.ERROR)
    if merged != with_output:
        problems.append(f"documents with an output: expected {with_output}, got {merged}")
    return problems


def overwritten(sessions: Any, target: Target) -> int:
    """Result rows that the rewrite pass changed (it must change none)."""
    with sessions.begin() as session:
        return int(session.scalar(
            text("SELECT count(*) FROM results WHERE job_id = :job AND "
                 "(output::text ILIKE :mark OR error_message ILIKE :mark)"),
            {"job": target.job_id, "mark": f"%{REWRITE_MARK}%"}) or 0)


def reset(sessions: Any, target: Target, *, results: bool, documents: bool) -> None:
    with sessions.begin() as session:
        if results:
            session.execute(text("TRUNCATE results"))
        if documents:
            session.execute(update(Document).where(Document.job_id == target.job_id)
                            .values(status=DocumentStatus.PENDING, output=None, error=None))
            session.execute(update(Job).where(Job.id == target.job_id)
                            .values(status=JobStatus.RUNNING, chunks_ok=0, chunks_error=0))


def timed_merge(sessions: Any, target: Target) -> float:
    t0 = time.perf_counter()
    with sessions.begin() as session:
        merge_job(session, target.job_id)
    return time.perf_counter() - t0


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    target, setup = produce(url, args.chunks, args.chunks_per_doc)
    print(f"producer: {setup['documents']:,} documents, {setup['chunks']:,} chunks, "
          f"{setup['batches']:,} batches in {setup['seconds']:.1f}s")
    sessions = make_sessionmaker(url)
    chunks = chunk_list(sessions, target.job_id)
    expected = expected_outcome(make_rows(target, chunks, args.error_share, seed=11))
    samples: dict[str, list[float]] = {}
    problems: list[str] = []
    for n in range(args.repeats):
        for size in args.flush_rows:
            def write(writers: int, mark: str = "", size: int = size) -> float:
                rows, s = write_pass(target, chunks, args.error_share, size, writers, mark)
                return rows / s

            reset(sessions, target, results=True, documents=False)
            samples.setdefault(f"upsert_2@{size}", []).append(write(2))
            reset(sessions, target, results=True, documents=True)
            samples.setdefault(f"upsert_1@{size}", []).append(write(1))
            samples.setdefault(f"rewrite_1@{size}", []).append(write(1, REWRITE_MARK))
            if changed := overwritten(sessions, target):
                problems.append(f"repeat {n + 1}: the rewrite changed {changed} final rows")
        for key in ("merge", "merge_2"):
            samples.setdefault(key, []).append(timed_merge(sessions, target))
            problems += [f"repeat {n + 1} {key}: {p}"
                         for p in check_merge(sessions, target, expected)]
        print(f"repeat {n + 1}: " + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in samples.items())
              + f"  (load {machine()['load']})")
    sessions.kw["bind"].dispose()
    return {"setup": setup, "samples": samples, "expected": expected, "problems": problems}


SCENARIOS = (
    ("upsert_1", "upsert, 1 writer", "rows/s"),
    ("upsert_2", "upsert, 2 writers", "rows/s"),
    ("rewrite_1", "rewrite (final rows kept)", "rows/s"),
    ("merge", "merge_job, fresh", "s"),
    ("merge_2", "merge_job, again", "s"),
)


def summarize(result: dict[str, Any], chunks: int, flush_sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for key, name, unit in SCENARIOS:
        for size in flush_sizes if unit == "rows/s" else [None]:
            values = result["samples"][f"{key}@{size}" if size else key]
            med = statistics.median(values)
            if unit == "rows/s":
                met, target = min(values) >= ROWS_PER_S_TARGET, f">= {ROWS_PER_S_TARGET:,.0f}"
            else:
                met, target = max(values) <= MERGE_S_TARGET, f"<= {MERGE_S_TARGET:.0f}"
            rows.append({"scenario": name, "flush": size or "", "rows": chunks, "unit": unit,
                         "min": min(values), "median": med, "max": max(values),
                         "seconds": chunks / med if unit == "rows/s" else med,
                         "target": target, "met": "yes" if met else "NO"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--chunks-per-doc", type=int, default=20)
    parser.add_argument("--flush-rows", type=lambda v: [int(x) for x in v.split(",")],
                        default=[200, 25], help="rows per flush, comma-separated: 200 is "
                        "FLUSH_ROWS; 25 is what a batch's writer flushes at most today")
    parser.add_argument("--error-share", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--json-name", default="store", help="benchmarks/results/NAME.json")
    args = parser.parse_args()
    load_before = machine()["load"]
    with tempfile.TemporaryDirectory() as tmp, results_store(args.pg_url, False, Path(tmp)) as url:
        result = run(args, url)
    chunks = result["setup"]["chunks"]
    rows = summarize(result, chunks, args.flush_rows)
    print(render_table(rows, [("scenario", "scenario"), ("flush", "flush"), ("rows", "rows"),
                              ("seconds", "s (median)"), ("unit", "unit"), ("min", "min"),
                              ("median", "median"), ("max", "max"), ("target", "target"),
                              ("met", "met?")]))
    for p in result["problems"]:
        print(f"CHECK FAILED: {p}")
    if not result["problems"]:
        print("checks: every merge matched the rows written; the rewrite kept every final row")
    path = write_json(args.json_name, {
        "parameters": vars(args), "load_before": load_before, "setup": result["setup"],
        "scenarios": rows, "samples": result["samples"], "expected": result["expected"],
        "problems": result["problems"],
    })
    print(f"load average {machine()['load']}; wrote {path}")
    if result["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
