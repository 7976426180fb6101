"""One answer per document: the reduce stage end to end, with real workers and the simulator.

The simulator answers every call with 20 tokens (sd 0), so the groups a reduce level forms are
known in advance: the context is chosen to leave 100 tokens of text for a reduce step, which
holds four 20-token summaries (and their separators) and not five. A 30-chunk document then
collapses 30 -> 8 -> 2 -> 1: three reduce levels, 11 reduce calls.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

from docqueue.models import Batch, Chunk, Document, Job, Result
from docqueue.tasks import submit
from docqueue.tasks.cli import cli
from docqueue.tasks.maintenance import reconcile
from docqueue.tasks.runtime import runtime
from docqueue.workers.ingest.chunking import Chunker
from docqueue.workers.jobs.sizing import room_for_text
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.settings import Settings

pytestmark = pytest.mark.integration

CHUNKS, REDUCE_CALLS, LEVELS = 30, 8 + 2 + 1, 3
SIM = ("--output-tokens-mean", "20", "--output-tokens-sd", "0", "--seed", "5")
SHAPE: dict[str, Any] = {"chunk_tokens": 40, "chunk_overlap_tokens": 0, "batch_max_chunks": 8,
                         "llm_max_tokens": 24}


def context_for_room(room: int) -> int:
    """The smallest context that leaves `room` tokens of text for a summarize reduce step."""
    pipeline = build_pipeline("summarize", {})
    for context in range(100, 4000):
        settings = Settings(llm_base_url="http://sim", llm_model="docq-sim", llm_mode="chat",
                            llm_context_tokens=context, llm_max_tokens=SHAPE["llm_max_tokens"])
        if room_for_text(settings, pipeline, level=1) >= room:
            return context
    raise AssertionError("no context found")


def long_document(chunks: int, tag: str = "") -> str:
    """A text the test's chunker cuts into exactly `chunks` chunks, every one different."""
    chunker = Chunker(SHAPE["chunk_tokens"], SHAPE["chunk_overlap_tokens"])
    sentences: list[str] = []
    while len(chunker.split(" ".join(sentences))) < chunks:
        i = len(sentences)
        sentences.append(f"Part {tag}{i}: the ferry number {i} left the harbour at {i % 12} "
                         f"o'clock with {i * 7} passengers and {i % 5} cars on board.")
    text = " ".join(sentences)
    assert len(chunker.split(text)) == chunks
    return text


def steps(job_id: int) -> list[tuple[int, int, str, int, bool]]:
    """(level, seq, status, attempts, cached) of every row of the job's one document."""
    with runtime().sessions() as s:
        return [tuple(r) for r in s.execute(  # type: ignore[misc]
            select(Chunk.level, Chunk.seq, Result.status, Result.attempts, Result.cached)
            .join(Result, Result.chunk_id == Chunk.id)
            .where(Chunk.job_id == job_id).order_by(Chunk.level, Chunk.seq))]


def per_level(rows: list[tuple[int, int, str, int, bool]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for level, *_ in rows:
        out[level] = out.get(level, 0) + 1
    return out


@pytest.fixture
def env(simulator: Any, docq_env: Any, workers: Any) -> Any:
    sim = simulator(*SIM)
    environment = docq_env(sim.url, llm_context_tokens=context_for_room(100), **SHAPE)
    workers(environment)
    return sim


def test_a_30_chunk_document_collapses_in_three_levels_to_one_summary(env: Any) -> None:
    sim = env
    # Given a document of 30 chunks and a context whose reduce step holds 4 summaries
    # When it is summarized
    handle = submit([("report", long_document(CHUNKS))], "summarize", cache="off")
    final = handle.wait(timeout=120)
    # Then the job succeeded with one summary, made in 3 reduce levels of 8, 2 and 1 steps
    assert final["status"] == "succeeded", final
    (doc,) = list(handle.results())
    assert doc["status"] == "ok" and doc["error"] is None
    summary = doc["output"]["summary"]
    assert summary and "\n" not in summary
    rows = steps(handle.id)
    assert per_level(rows) == {0: CHUNKS, 1: 8, 2: 2, 3: 1}
    assert all(status == "ok" and attempts == 1 for _, _, status, attempts, _ in rows)
    made = doc["output"]["made"]
    assert made["chunks"] == CHUNKS and made["levels"] == LEVELS
    assert made["reduce_steps"] == REDUCE_CALLS and made["calls"] == CHUNKS + REDUCE_CALLS
    # and every call went to the provider once, its tokens counted in the job and document
    assert sim.stats()["requests_total"] == CHUNKS + REDUCE_CALLS
    assert final["tokens_in"] == doc["tokens_in"] == made["tokens_in"]
    assert final["chunks_total"] == CHUNKS and final["chunks_by_state"] == {"ok": CHUNKS}
    # and `docq results` prints the one answer, `--level chunk` each chunk's own output
    runner = CliRunner()
    documents = runner.invoke(cli, ["results", str(handle.id)])
    assert documents.exit_code == 0, documents.output
    assert [json.loads(line)["output"]["summary"] for line in documents.output.splitlines()] == [
        summary]
    chunks = runner.invoke(cli, ["results", str(handle.id), "--level", "chunk"])
    assert chunks.exit_code == 0, chunks.output
    records = [json.loads(line) for line in chunks.output.splitlines()]
    assert [c["chunk"] for c in records] == list(range(CHUNKS))
    assert all(c["status"] == "ok" and c["output"]["summary"] for c in records)


def test_a_crash_between_levels_resumes_without_new_map_calls(env: Any) -> None:
    sim = env
    # Given a summarized 30-chunk document (the response cache off: every call is paid)
    handle = submit([("report", long_document(CHUNKS))], "summarize", cache="off")
    assert handle.wait(timeout=120)["status"] == "succeeded"
    paid = sim.stats()["requests_total"]
    # and the store put back as a worker killed between levels leaves it: the chunks' results
    # recorded, no reduce level made, the job running
    with runtime().sessions.begin() as s:
        map_rows = {r.chunk_id: (r.updated_at, r.attempts) for r in s.scalars(
            select(Result).join(Chunk, Chunk.id == Result.chunk_id)
            .where(Chunk.job_id == handle.id, Chunk.level == 0))}
        reduce_ids = select(Chunk.id).where(Chunk.job_id == handle.id, Chunk.level > 0)
        s.execute(delete(Result).where(Result.chunk_id.in_(reduce_ids)))
        s.execute(delete(Chunk).where(Chunk.job_id == handle.id, Chunk.level > 0))
        s.execute(delete(Batch).where(Batch.job_id == handle.id, Batch.seq < 0))
        s.execute(update(Job).where(Job.id == handle.id)
                  .values(status="running", finished_at=None))
        s.execute(update(Document).where(Document.job_id == handle.id)
                  .values(status="pending", output=None))
    # When the reconciler looks at the job (beat, or `docq resume`)
    reconcile([handle.id], merge_inline=True)
    final = handle.wait(timeout=120)
    # Then the job ends with its one summary again, after the reduce calls alone
    assert final["status"] == "succeeded", final
    (doc,) = list(handle.results())
    assert doc["status"] == "ok" and doc["output"]["made"]["levels"] == LEVELS
    assert sim.stats()["requests_total"] - paid == REDUCE_CALLS
    # and no chunk was sent again: its result row is the one recorded before
    with runtime().sessions() as s:
        after = {r.chunk_id: (r.updated_at, r.attempts) for r in s.scalars(
            select(Result).join(Chunk, Chunk.id == Result.chunk_id)
            .where(Chunk.job_id == handle.id, Chunk.level == 0))}
    assert after == map_rows


def test_a_resubmitted_unchanged_corpus_makes_no_call_at_any_level(env: Any) -> None:
    sim = env
    corpus = [("report", long_document(CHUNKS)), ("note", long_document(3, tag="n"))]
    # Given a corpus summarized once
    first = submit(corpus, "summarize")
    assert first.wait(timeout=120)["status"] == "succeeded"
    paid = sim.stats()["requests_total"]
    assert paid == CHUNKS + REDUCE_CALLS + 3 + 1
    # When the same corpus is submitted again
    second = submit(corpus, "summarize")
    final = second.wait(timeout=120)
    # Then no call reached the provider, every row at every level came from the cache, and the
    # answers are the same
    assert final["status"] == "succeeded", final
    assert sim.stats()["requests_total"] == paid
    rows = steps(second.id)
    assert max(level for level, *_ in rows) == LEVELS
    assert all(cached for *_, cached in rows)
    before = {d["id"]: d["output"]["summary"] for d in first.results()}
    again = {d["id"]: d["output"]["summary"] for d in second.results()}
    assert again == before
    assert all(d["output"]["made"]["calls"] == 0 for d in second.results())


def test_a_budget_counts_reduce_calls(env: Any) -> None:
    sim = env
    text = long_document(CHUNKS)
    # Given what the map level and the reduce levels of a document cost, measured
    measured = submit([("report", text)], "summarize", cache="off")
    assert measured.wait(timeout=120)["status"] == "succeeded"
    spent = {False: 0, True: 0}
    with runtime().sessions() as s:
        for is_reduce, tokens in s.execute(
            select(Chunk.level > 0, Result.tokens_in + Result.tokens_out)
            .join(Result, Result.chunk_id == Chunk.id).where(Chunk.job_id == measured.id)
        ):
            spent[bool(is_reduce)] += tokens
    map_tokens, reduce_tokens = spent[False], spent[True]
    calls = sim.stats()["requests_total"]
    # When it runs again with a budget that covers the map level and half the reduce
    budget = map_tokens + reduce_tokens // 2
    handle = submit([("report", text)], "summarize", cache="off", budget_tokens=budget)
    final = handle.wait(timeout=120)
    # Then the reduce calls counted against it: some reduce steps were skipped, the job is
    # partial and says why, the document has an answer marked partial
    assert final["status"] == "partial", final
    assert "reduce steps skipped: budget reached" in final["reason"]
    rows = steps(handle.id)
    skipped = [r for r in rows if r[2] == "skipped_budget"]
    assert skipped and all(level > 0 for level, *_ in skipped)
    (doc,) = list(handle.results())
    assert doc["status"] == "partial" and doc["output"]["summary"]
    assert "reduce steps did not succeed" in doc["error"]
    # and the spend stayed within the budget plus the calls in flight when it was reached
    largest_step = max(map_tokens // CHUNKS, reduce_tokens // 8) * 2
    assert final["tokens_in"] + final["tokens_out"] <= budget + 8 * largest_step
    assert sim.stats()["requests_total"] - calls < CHUNKS + REDUCE_CALLS


def test_a_document_with_failed_chunks_is_reduced_from_the_rest_and_marked_partial(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider that fails 20% of calls and one attempt per call
    sim = simulator(*SIM[:4], "--fail-rate", "0.2", "--seed", "11")
    environment = docq_env(sim.url, llm_context_tokens=context_for_room(100), max_attempts=1,
                           **SHAPE)
    workers(environment)
    # When a 30-chunk document is summarized
    handle = submit([("report", long_document(CHUNKS))], "summarize", cache="off")
    final = handle.wait(timeout=120)
    # Then the document has one summary from the chunks that succeeded, marked partial, and
    # its error and its record name the failed chunks
    assert final["status"] == "partial", final
    (doc,) = list(handle.results())
    failed = sorted(seq for level, seq, status, *_ in steps(handle.id)
                    if level == 0 and status == "error")
    assert failed, "the seed should fail some chunks"
    assert doc["status"] == "partial" and doc["output"]["summary"]
    assert doc["output"]["made"]["failed_chunks"] == failed
    assert f"{len(failed)} of {CHUNKS} chunks failed" in doc["error"]
    assert f"chunk{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed[:20]))}" in doc[
        "error"]
    assert doc["output"]["made"]["levels"] >= 1


def test_documents_are_read_as_they_finish_while_the_job_runs(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given calls of 300 ms, a one-chunk note and a 30-chunk report (three reduce levels)
    sim = simulator(*SIM, "--latency-ms", "300")
    environment = docq_env(sim.url, llm_context_tokens=context_for_room(100), **SHAPE)
    workers(environment)
    handle = submit([("report", long_document(CHUNKS)), ("note", long_document(1, tag="n"))],
                    "summarize", cache="off")
    # When the results are read as the job runs
    seen: list[tuple[str, str, str]] = []
    for doc in handle.iter_results(poll_s=0.1, timeout=120):
        seen.append((doc["id"], doc["status"], handle.status()["status"]))
    # Then the note came first, with its answer, while the report was still being reduced
    assert [s[0] for s in seen] == ["note", "report"], seen
    assert seen[0][1] == "ok" and seen[0][2] == "running"
    assert seen[1][1] == "ok" and handle.status()["status"] == "succeeded"
