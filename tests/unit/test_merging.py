"""The merge: per document in chunk order, per job with counts, tokens, cost and status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import (
    Batch,
    BatchStatus,
    Chunk,
    Document,
    Job,
    JobStatus,
    Result,
    make_sessionmaker,
    upgrade,
)
from docqueue.workers.batch.leases import start_delivery
from docqueue.workers.jobs.merging import after_batch, merge_job
from docqueue.workers.pipelines import build_pipeline

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path}/merge.db"
    upgrade(url)
    return make_sessionmaker(url)


def make_job(s: Session, pipeline: str, options: dict[str, Any], docs: list[list[Any]],
             rejected: int = 0) -> int:
    """Docs given as lists of chunk outcomes: ("ok", output, tokens_in, tokens_out, cost) or
    ("error", message) or None (no result yet)."""
    pipe = build_pipeline(pipeline, options)
    job = Job(pipeline=pipe.name, pipeline_version=pipe.version, options=pipe.describe(),
              endpoint="sim", model="m", mode="chat", status=JobStatus.RUNNING,
              documents_total=len(docs) + rejected, documents_rejected=rejected,
              chunks_total=sum(len(d) for d in docs), submitted_at=T0)
    s.add(job)
    s.flush()
    for n, outcomes in enumerate(docs):
        doc = Document(job_id=job.id, external_id=f"d{n}", chunk_count=len(outcomes))
        s.add(doc)
        s.flush()
        # Insert chunks in reverse so that only ordering by seq gives chunk order.
        for seq in reversed(range(len(outcomes))):
            chunk = Chunk(job_id=job.id, document_id=doc.id, batch_seq=1, seq=seq,
                          text=f"chunk {seq}", char_start=0, char_end=1, token_count=1)
            s.add(chunk)
            s.flush()
            outcome = outcomes[seq]
            if outcome is None:
                continue
            row = Result(chunk_id=chunk.id, document_id=doc.id, job_id=job.id,
                         pipeline_version=pipe.version, attempts=1,
                         updated_at=T0 + timedelta(seconds=10 + seq))
            if outcome[0] == "ok":
                _, row.output, row.tokens_in, row.tokens_out, row.cost = outcome
                row.status, row.latency_ms = "ok", 100.0 * (seq + 1)
            else:
                row.status, row.error_message = "error", outcome[1]
            s.add(row)
    return job.id


def ok(text: str, cost: float | None = 0.001) -> tuple[Any, ...]:
    return ("ok", {"summary": text}, 10, 5, cost)


def test_documents_merge_in_chunk_order_and_the_job_totals_add_up(
    sessions: sessionmaker[Session],
) -> None:
    # Given two documents whose chunks all succeeded
    with sessions.begin() as s:
        job_id = make_job(s, "summarize", {}, [[ok("A."), ok("B."), ok("C.")], [ok("D.")]])
    # When the job is merged
    with sessions.begin() as s:
        summary = merge_job(s, job_id)
    # Then each document holds its summaries in chunk order and the job its totals
    with sessions() as s:
        job = s.get(Job, job_id)
        docs = s.query(Document).order_by(Document.id).all()
        assert summary is not None and summary.status == JobStatus.SUCCEEDED
        assert job is not None and job.status == JobStatus.SUCCEEDED and job.reason is None
        assert docs[0].output["summary"].split() == ["A.", "B.", "C."]
        assert docs[0].status == "ok" and docs[1].status == "ok"
        assert (job.chunks_ok, job.tokens_in, job.tokens_out) == (4, 40, 20)
        assert job.cost == pytest.approx(0.004)
        assert job.latency_p50_ms == pytest.approx(150.0)
        assert job.finished_at is not None and job.chunks_per_s == pytest.approx(4 / 12)


def test_errors_make_documents_partial_or_error_and_the_job_partial(
    sessions: sessionmaker[Session],
) -> None:
    # Given one document with a failed chunk and one where every chunk failed
    with sessions.begin() as s:
        job_id = make_job(s, "summarize", {}, [
            [ok("A."), ("error", "HTTP 400 context_length_exceeded: too long")],
            [("error", "boom"), ("error", "boom")],
        ])
    with sessions.begin() as s:
        merge_job(s, job_id)
    with sessions() as s:
        job = s.get(Job, job_id)
        d0, d1 = s.query(Document).order_by(Document.id).all()
        # Then the first is partial with the first error named, the second an error
        assert d0.status == "partial" and d0.output["summary"] == "A."
        assert d0.error == ("1 of 2 chunks failed (chunk 1); first error: "
                            "HTTP 400 context_length_exceeded: too long")
        assert d1.status == "error" and d1.output is None
        assert job is not None and job.status == JobStatus.PARTIAL
        assert job.reason == "3 chunks failed" and (job.chunks_ok, job.chunks_error) == (1, 3)


def test_a_job_with_chunks_still_missing_stays_running(sessions: sessionmaker[Session]) -> None:
    # Given a chunk without a final result
    with sessions.begin() as s:
        job_id = make_job(s, "summarize", {}, [[ok("A."), None]])
    with sessions.begin() as s:
        merge_job(s, job_id)
    with sessions() as s:
        job = s.get(Job, job_id)
        # Then the job is not finished and says why
        assert job is not None and job.status == JobStatus.RUNNING
        assert job.reason == "1 chunks or reduce steps have no final result yet"
        assert job.finished_at is None


def test_classify_merges_to_the_majority_label_with_counts(
    sessions: sessionmaker[Session],
) -> None:
    labels = ["sport", "politics"]
    with sessions.begin() as s:
        job_id = make_job(s, "classify", {"labels": labels}, [[
            ("ok", {"label": "politics"}, 1, 1, None),
            ("ok", {"label": "sport"}, 1, 1, None),
            ("ok", {"label": "politics"}, 1, 1, None),
        ]])
    with sessions.begin() as s:
        merge_job(s, job_id)
    with sessions() as s:
        doc = s.query(Document).one()
        job = s.get(Job, job_id)
        assert doc.output["label"] == "politics"
        assert doc.output["counts"] == {"sport": 1, "politics": 2}
        # an unknown price makes the cost unknown, not zero
        assert job is not None and job.cost is None


def test_rejected_documents_make_the_job_partial_and_merging_twice_changes_nothing(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        job_id = make_job(s, "summarize", {}, [[ok("A.")]], rejected=2)
    snapshots = []
    for _ in range(2):
        with sessions.begin() as s:
            merge_job(s, job_id)
        with sessions() as s:
            job = s.get(Job, job_id)
            assert job is not None
            snapshots.append((job.status, job.reason, job.chunks_ok, job.tokens_in, job.cost,
                              job.latency_p50_ms, job.finished_at, job.chunks_per_s))
    assert snapshots[0] == snapshots[1]
    assert snapshots[0][:2] == (JobStatus.PARTIAL, "2 documents rejected")


def test_the_merge_writes_only_the_documents_whose_row_differs_and_mends_a_stale_one(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given three finished documents, merged once (as after_batch leaves them by the job's end)
    with sessions.begin() as s:
        job_id = make_job(s, "summarize", {}, [[ok("A."), ok("B.")], [ok("C.")], [ok("D.")]])
    with sessions.begin() as s:
        merge_job(s, job_id)
    with sessions() as s:
        good = {d.id: (d.status, d.output, d.tokens_in, d.cost)
                for d in s.scalars(select(Document).order_by(Document.id))}
    # and one of them stale in the store (a lost write, a hand edit)
    stale = min(good)
    with sessions.begin() as s:
        doc = s.get(Document, stale)
        assert doc is not None
        doc.status, doc.output, doc.tokens_in = "pending", None, 0
    writes: list[list[int]] = []
    real_execute = Session.execute

    def execute(self: Session, statement: Any, params: Any = None, **kw: Any) -> Any:
        table = getattr(statement, "table", None)
        if isinstance(params, list) and getattr(table, "name", "") == "documents":
            writes.append([p["id"] for p in params])
        return real_execute(self, statement, params, **kw)

    monkeypatch.setattr(Session, "execute", execute)
    # When the job is merged again
    with sessions.begin() as s:
        merge_job(s, job_id)
    monkeypatch.undo()
    # Then only the stale document was written, and it holds its answer again
    assert writes == [[stale]]
    with sessions() as s:
        assert {d.id: (d.status, d.output, d.tokens_in, d.cost)
                for d in s.scalars(select(Document).order_by(Document.id))} == good


def test_a_reduce_level_whose_message_was_never_sent_is_sent_again_by_its_parents_rerun(
    sessions: sessionmaker[Session],
) -> None:
    # Given a summarize job (answers reduced) of one document of three chunks, all answered,
    # in batch 1
    with sessions.begin() as s:
        job_id = make_job(s, "summarize", {}, [[ok("a"), ok("b"), ok("c")]])
        job = s.get(Job, job_id)
        assert job is not None
        job.reduce_tokens = 1_000  # its answers are reduced into one
        s.add(Batch(job_id=job_id, seq=1, chunk_count=3, token_count=3, status=BatchStatus.DONE))
        s.flush()
        parent = s.scalars(select(Batch.id).where(Batch.seq == 1)).one()
    # When the batch's end makes the document's reduce level (its message then lost: the
    # worker was killed between the store's commit and the send)
    with sessions.begin() as s:
        first = after_batch(s, parent)
    assert first is not None and len(first.new_batches) == 1
    # Then the batch's message, delivered again, finds the level never started and sends it
    with sessions.begin() as s:
        again = after_batch(s, parent)
    assert again is not None and again.new_batches == first.new_batches
    # and once a delivery of the level has started, a rerun sends nothing more
    with sessions.begin() as s:
        assert start_delivery(s, first.new_batches[0]) is not None
    with sessions.begin() as s:
        late = after_batch(s, parent)
    assert late is not None and late.new_batches == []
