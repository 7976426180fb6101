"""A job end to end: submit, real workers over Celery (on Redis or RabbitMQ) and Redis, the
simulator, merge into PostgreSQL."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from docqueue.models import FINAL_JOB_STATES, Batch, Chunk, Document, Job, Result
from docqueue.tasks import submit
from docqueue.tasks.runtime import runtime

pytestmark = pytest.mark.integration

TEXT = (
    "The harbour town woke early. Fishing boats left before dawn and came back at noon with "
    "their catch, which was sold on the quay to restaurants and families alike. "
)


def corpus(n: int, paragraphs: int = 3) -> list[tuple[str, str]]:
    # Every chunk different: identical chunks would be answered from the response cache.
    return [(f"doc-{i}", f"Document {i}. " + " ".join(f"({i}.{p}) {TEXT}" for p in
                                                      range(paragraphs))) for i in range(n)]


def rows(job_id: int) -> list[Result]:
    with runtime().sessions() as s:
        return list(s.scalars(select(Result).where(Result.job_id == job_id)))


def chunk_count(job_id: int) -> int:
    with runtime().sessions() as s:
        return s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job_id))


@pytest.mark.parametrize(
    ("pipeline", "options", "check"),
    [
        ("summarize", {}, lambda out: isinstance(out["summary"], str) and out["summary"]),
        ("classify", {"labels": ["fishing", "finance", "sport"]},
         lambda out: out["label"] in {"fishing", "finance", "sport"}
         and sum(out["counts"].values()) >= 1),
        ("extract", {"schema": {"type": "object", "properties": {
            "place": {"type": "string"}, "boats": {"type": "integer"}},
            "required": ["place", "boats"]}},
         lambda out: out["items"] and all(isinstance(o["boats"], int) for o in out["items"])),
        ("custom", {"prompt": "List the nouns in: {text}"}, lambda out: out is not None),
    ],
)
def test_each_pipeline_ends_with_one_result_per_chunk(
    simulator: Any, docq_env: Any, workers: Any, pipeline: str, options: dict[str, Any], check: Any
) -> None:
    # Given a simulator, two worker processes and a small corpus
    sim = simulator("--seed", "1")
    env = docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, batch_max_chunks=4)
    workers(env)
    # When the corpus is submitted with the pipeline
    handle = submit(corpus(5), pipeline, **options, cache="off")  # one real call per chunk
    final = handle.wait(timeout=60)
    # Then the job succeeded with one ok result per chunk, merged into each document
    assert final["status"] == "succeeded", final
    n = chunk_count(handle.id)
    assert n > 5
    results = rows(handle.id)
    assert len(results) == n and {r.status for r in results} == {"ok"}
    assert all(r.tokens_in > 0 and r.tokens_out > 0 and r.attempts == 1 for r in results)
    assert final["tokens_in"] == sum(r.tokens_in for r in results)
    docs = list(handle.results())
    assert [d["id"] for d in docs] == [f"doc-{i}" for i in range(5)]
    assert all(d["status"] == "ok" and check(d["output"]) for d in docs), docs
    assert final["cost"] == 0.0  # the simulator's model has a known price of zero
    assert final["latency_p50_ms"] is not None and final["chunks_per_s"] is not None


def test_completion_mode_works_end_to_end(simulator: Any, docq_env: Any, workers: Any) -> None:
    # Given a worker that calls /v1/completions (langchain-openai's OpenAI class)
    sim = simulator("--seed", "2")
    env = docq_env(sim.url, llm_mode="completion", chunk_tokens=60, chunk_overlap_tokens=0)
    workers(env, concurrency=1)
    # When a summarize job runs
    handle = submit(corpus(3), "summarize", cache="off")
    final = handle.wait(timeout=60)
    # Then every chunk has text and real usage from the completions endpoint
    assert final["status"] == "succeeded", final
    results = rows(handle.id)
    assert sim.stats()["requests_total"] == len(results) == chunk_count(handle.id)
    assert all(r.tokens_in > 0 and r.tokens_out > 0 and r.output["summary"] for r in results)


def test_transient_faults_are_retried_until_every_chunk_succeeds(
    simulator: Any, docq_env: Any, workers: Any, broker: dict[str, str], redis_client: Any
) -> None:
    # Given a provider where 20% of calls fail with 500/502/503, and workers whose tasks travel
    # on Redis, then on RabbitMQ (with docqueue's state in Redis)
    sim = simulator("--fail-rate", "0.2", "--seed", "7")
    env = docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, max_attempts=10,
                   batch_max_chunks=5, **broker)
    workers(env)
    # When a job of about 60 chunks runs
    handle = submit(corpus(15), "summarize", cache="off")
    final = handle.wait(timeout=120)
    # Then every chunk ended ok, some after more than one attempt, and the attempts add up
    assert final["status"] == "succeeded", final
    results = rows(handle.id)
    assert {r.status for r in results} == {"ok"}
    attempts = sum(r.attempts for r in results)
    assert attempts > len(results)
    served = sim.stats()
    assert served["requests_total"] == attempts
    # and the tasks travelled on the broker asked for: kombu's queue bindings are in Redis only
    # when Redis is the broker, and the limiter's state is in Redis either way
    assert bool(redis_client.exists("_kombu.binding.celery")) == ("broker_url" not in broker)
    assert redis_client.keys("docq:*")


def test_a_threads_pool_worker_runs_many_batches_at_once_in_one_process(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider with 300 ms of latency and 10% transient faults, and one worker process
    # running 8 batches at once on threads
    sim = simulator("--latency-ms", "300", "--fail-rate", "0.1", "--seed", "3")
    env = docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, max_attempts=10,
                   batch_max_chunks=4)
    workers(env, concurrency=8, pool="threads")
    # When a job of about 80 chunks (some 20 batches) runs
    handle = submit(corpus(20), "summarize", cache="off")
    final = handle.wait(timeout=120)
    # Then every chunk ended ok with one row each, the provider saw each attempt once, and more
    # calls were in flight at once than one batch holds
    assert final["status"] == "succeeded", final
    results = rows(handle.id)
    assert len(results) == chunk_count(handle.id)  # each chunk's, and each reduce step's
    assert final["chunks_by_state"] == {"ok": final["chunks_total"]}
    assert {r.status for r in results} == {"ok"}
    served = sim.stats()
    assert served["requests_total"] == sum(r.attempts for r in results)
    assert served["peak_in_flight"] > 4


def test_permanent_errors_end_partial_with_messages_and_the_merge_runs(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider whose context window (150 tokens) is smaller than the long document's
    # 400-token chunks, and a short document that fits
    sim = simulator("--context-limit", "150", "--seed", "3")
    env = docq_env(sim.url, chunk_tokens=400, chunk_overlap_tokens=0)
    workers(env)
    long_text = " ".join(f"harbour{i}" for i in range(500))
    # When both are submitted
    handle = submit([("short", "A short note about boats."), ("long", long_text)], "summarize")
    final = handle.wait(timeout=60)
    # Then the merge ran: the job is partial, the short document ok, the long one an error
    assert final["status"] == "partial", final
    docs = {d["id"]: d for d in handle.results()}
    assert docs["short"]["status"] == "ok" and docs["long"]["status"] == "error"
    assert "3 of 3 chunks failed" in docs["long"]["error"]
    assert "context_length_exceeded" in docs["long"]["error"]
    # and each long chunk was tried once, with the provider's reason recorded
    errors = [r for r in rows(handle.id) if r.status == "error"]
    assert errors and all(r.attempts == 1 and r.http_status == 400 for r in errors)
    assert all("context_length_exceeded" in (r.error_message or "") for r in errors)
    assert sim.stats()["requests_total"] == chunk_count(handle.id)


def test_every_kind_of_bad_input_is_explained_and_the_rest_processed(
    simulator: Any, docq_env: Any, workers: Any, tmp_path: Path
) -> None:
    # Given a directory with good documents and every kind of bad one
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "good.txt").write_text("Boats and nets. " * 20)
    (d / "good.md").write_text("# Title\n\nA markdown note about the harbour. " * 5)
    (d / "page.html").write_text("<html><body><p>The quay at noon.</p><script>x()</script>"
                                 "</body></html>")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (d / "latin1.txt").write_bytes("Le café était très chaud au port. ".encode("latin-1") * 5)
    noise = random.Random(3)  # high bytes that no encoding reads as text
    (d / "noise.txt").write_bytes(bytes(noise.randrange(0x80, 0x100) for _ in range(400)))
    (d / "big.txt").write_text("x" * 5000)
    (d / "image.png").write_bytes(b"\x89PNG....")
    lines = [
        json.dumps({"id": "j1", "text": "A good line about fishing."}),
        "this is not json",
        json.dumps({"id": "j2"}),
        json.dumps({"id": "j1", "text": "duplicate id"}),
    ]
    (d / "docs.jsonl").write_text("\n".join(lines) + "\n")
    sim = simulator("--seed", "4")
    env = docq_env(sim.url, max_document_bytes=4000)
    workers(env)
    # When the directory and a missing path are submitted
    handle = submit([str(d), str(tmp_path / "missing.txt")], "summarize")
    final = handle.wait(timeout=60)
    # Then each bad document carries its own reason and the good ones have outputs
    docs = list(handle.results())
    ok = {d["id"] for d in docs if d["status"] == "ok"}
    assert ok == {"good.txt", "good.md", "page.html", "latin1.txt", "j1"}, docs
    assert all(d["output"]["summary"] for d in docs if d["status"] == "ok")
    rejected = {d["source"]: d["error"] for d in docs if d["status"] == "rejected"}
    assert len(rejected) == 9, rejected
    assert final["status"] == "partial"
    assert final["documents_rejected"] == 9
    reasons = {Path(k.split(":")[0]).name + (":" + k.split(":")[1] if ":" in k else ""): v
               for k, v in rejected.items()}
    expected = {
        "empty.txt": "is empty", "binary.txt": "binary", "noise.txt": "not valid UTF-8",
        "big.txt": "over the limit", "image.png": "supported ones",
        "docs.jsonl:2": "not valid JSON",
        "docs.jsonl:3": "has no 'text'", "docs.jsonl:4": "repeats the id 'j1'",
        "missing.txt": "does not exist",
    }
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])


def test_the_same_batch_delivered_twice_calls_the_model_once_per_chunk(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a job that is recorded but not yet published, and slow model calls
    from docqueue.tasks.batches import process_batch
    from docqueue.workers.jobs.submission import create_job, ingest, mark_submitted
    from docqueue.workers.pipelines import build_pipeline

    sim = simulator("--latency-ms", "300", "--seed", "5")
    env = docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0, batch_max_chunks=10)
    workers(env, concurrency=2)
    rt = runtime()
    with rt.sessions.begin() as s:
        job_id = create_job(s, rt.settings, build_pipeline("summarize", {})).id
    ingest(rt.sessions, rt.settings, job_id, _sources(corpus(2)))
    with rt.sessions.begin() as s:
        mark_submitted(s, job_id)
        batch_id = s.scalar(select(Batch.id).where(Batch.job_id == job_id, Batch.seq == 1))
        in_batch = s.scalar(select(Batch.chunk_count).where(Batch.id == batch_id))
    # When the same message is delivered twice at the same moment (same task id)
    task_id = str(uuid.uuid4())
    first = process_batch.apply_async((batch_id,), task_id=task_id)
    second = process_batch.apply_async((batch_id,), task_id=task_id)
    first.get(timeout=60)
    second.get(timeout=60)
    # Then each chunk of the batch was sent to the model once and has exactly one row
    results = rows(job_id)
    assert len(results) == in_batch
    assert Counter(r.chunk_id for r in results).most_common(1)[0][1] == 1
    assert sim.stats()["requests_total"] == in_batch
    assert all(r.attempts == 1 for r in results)


def _sources(pairs: list[tuple[str, str]]) -> Any:
    from docqueue.workers.ingest.sources import iter_documents

    return iter_documents(pairs, max_bytes=10**6)


def test_merge_twice_leaves_the_same_state(simulator: Any, docq_env: Any, workers: Any) -> None:
    # Given a finished job
    from docqueue.workers.jobs.merging import merge_job

    sim = simulator("--seed", "6")
    env = docq_env(sim.url, chunk_tokens=40, chunk_overlap_tokens=0)
    workers(env)
    handle = submit(corpus(3), "summarize")
    handle.wait(timeout=60)
    before = _snapshot(handle.id)
    # When the merge runs again
    with runtime().sessions.begin() as s:
        merge_job(s, handle.id)
    # Then nothing changed
    assert _snapshot(handle.id) == before


def _snapshot(job_id: int) -> Any:
    with runtime().sessions() as s:
        job = s.get(Job, job_id)
        docs = s.execute(select(Document.id, Document.status, Document.output)
                         .where(Document.job_id == job_id).order_by(Document.id)).all()
        assert job is not None
        return (job.status, job.chunks_ok, job.tokens_in, job.latency_p50_ms, job.finished_at,
                job.chunks_per_s, [tuple(d) for d in docs])


def test_the_job_is_final_promptly_after_its_last_result(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given calls of 0.3-1.0 s (batches end unevenly) and `docq worker` as users run it
    sim = simulator("--latency-ms", "300", "--jitter-ms", "700", "--seed", "5")
    env = docq_env(sim.url, chunk_tokens=200, chunk_overlap_tokens=0)
    workers(env)
    # When a job of 400 one-chunk documents runs, watched every 20 ms
    handle = submit(corpus(400, paragraphs=1), "summarize", cache="off")
    deadline = time.monotonic() + 120
    while (status := handle.status())["status"] not in FINAL_JOB_STATES:
        assert time.monotonic() < deadline, status
        time.sleep(0.02)
    seen_final = time.time()
    # Then it is final soon after its last result row. What it waits for: the last batch's
    # task ending (its flush, its documents' answers, its story), the chord's count in Redis,
    # the callback's delivery (Redis's native chord: no polling) and the merge of 400
    # documents: under 2 s on a quiet machine, and a few seconds with the CPU shared by a
    # loaded CI run (benchmarks/bench_tail.py measures it). The reconciler, the only other way
    # to a final job, looks every DOCQ_RECONCILE_EVERY_S (60 s): a job that took that long
    # would have lost its callback.
    assert status["status"] == "succeeded", status
    last = max(r.updated_at for r in rows(handle.id)).timestamp()
    assert 0 <= seen_final - last < 10.0, seen_final - last
