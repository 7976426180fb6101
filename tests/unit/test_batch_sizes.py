"""How many chunks each batch of a job takes: small first, large in the middle, small at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Batch, Chunk, make_sessionmaker, upgrade
from docqueue.workers.ingest.batching import BatchSizes
from docqueue.workers.ingest.sources import iter_documents
from docqueue.workers.jobs.submission import create_job, ingest
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.settings import Settings


def test_batches_double_from_the_least_to_the_most() -> None:
    sizes = BatchSizes(most=100, least=8, slots=4)
    assert [sizes.size(i) for i in range(6)] == [8, 16, 32, 64, 100, 100]
    assert sizes.size(10_000) == 100  # far into a long job, no overflow


def test_near_the_end_a_batch_takes_a_share_of_what_remains_for_the_slots_present() -> None:
    sizes = BatchSizes(most=100, least=8, slots=4)
    # 4 slots: a quarter of what is left, between the least and the most
    assert sizes.size(20, remaining=10_000) == 100
    assert sizes.size(20, remaining=200) == 50
    assert sizes.size(20, remaining=201) == 51
    assert sizes.size(20, remaining=30) == 8
    assert sizes.size(0, remaining=200) == 8  # the first batch stays small
    assert sizes.tail == 400  # from 400 chunks before the end, batches are below the most


def test_the_least_at_or_above_the_most_gives_every_batch_the_same_size() -> None:
    sizes = BatchSizes(most=4, least=8, slots=2)
    assert [sizes.size(i) for i in range(3)] == [4, 4, 4]
    assert sizes.size(5, remaining=1) == 4
    assert sizes.tail == 0


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    return make_sessionmaker(url)


def submitted_sizes(sessions: sessionmaker[Session], settings: Settings, n_docs: int,
                    slots: int) -> list[int]:
    """Ingest `n_docs` one-chunk documents; the chunk count of each batch, in order."""
    pipeline = build_pipeline("summarize", {})
    with sessions.begin() as s:
        job_id = create_job(s, settings, pipeline).id
    docs = [(f"d{i}", f"Note {i}: the harbour opens at dawn.") for i in range(n_docs)]
    ingest(sessions, settings, job_id, iter_documents(docs, max_bytes=10**6), slots)
    with sessions.begin() as s:
        batches = s.execute(select(Batch.seq, Batch.chunk_count).where(Batch.job_id == job_id)
                            .order_by(Batch.seq)).all()
        per_chunk = s.scalars(select(Chunk.batch_seq).where(Chunk.job_id == job_id)
                              .order_by(Chunk.id)).all()
    # Every chunk is in the batch its row names, in order, and the rows count them right
    assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
    assert [per_chunk.count(b.seq) for b in batches] == [b.chunk_count for b in batches]
    assert per_chunk == sorted(per_chunk)
    return [b.chunk_count for b in batches]


def test_a_job_starts_small_runs_large_and_ends_small(sessions: sessionmaker[Session],
                                                      tmp_path: Path) -> None:
    # Given batches of 8 to 64 chunks and 2 slots, a job of 12,000 one-chunk documents: more
    # than two of the producer's writes, so its end is known only at the last one
    settings = Settings(database_url=f"sqlite:///{tmp_path}/store.db", batch_max_chunks=64,
                        batch_min_chunks=8, llm_base_url="http://fake/v1", llm_model="fake")
    sizes = submitted_sizes(sessions, settings, 12_000, slots=2)
    # Then the batches double up to 64, stay there, and shrink over the last chunks to 8
    assert sizes[:4] == [8, 16, 32, 64]
    assert sum(sizes) == 12_000
    middle = sizes[4:-12]
    assert middle and set(middle) == {64}
    tail = sizes[-12:]
    assert tail == sorted(tail, reverse=True) and tail[0] <= 64 and tail[-2] == 8
    assert 0 < tail[-1] <= 8


def test_a_small_job_is_spread_over_the_slots_present(sessions: sessionmaker[Session],
                                                     tmp_path: Path) -> None:
    # Given batches of up to 100 chunks and 8 slots, a job of 300 chunks
    settings = Settings(database_url=f"sqlite:///{tmp_path}/store.db", batch_max_chunks=100,
                        batch_min_chunks=8, llm_base_url="http://fake/v1", llm_model="fake")
    sizes = submitted_sizes(sessions, settings, 300, slots=8)
    # Then no batch holds more than an eighth of what was left when it opened, so there are
    # more batches than slots and none is a straggler
    assert sizes[:3] == [8, 16, 32]
    remaining = 300
    for size in sizes[:-1]:
        assert size <= max(8, -(-remaining // 8))
        remaining -= size
    assert max(sizes) <= 38 and len(sizes) > 8
    assert sum(sizes) == 300
