"""Listing and purging jobs on an embedded (SQLite) store: no servers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from docqueue.models import Chunk, Document, Job, Result, make_sessionmaker, upgrade
from docqueue.workers.errors import InputError
from docqueue.workers.jobs.lifecycle import list_jobs, purge


def add_job(session: Session, name: str, status: str) -> int:
    job = Job(name=name, pipeline="summarize", pipeline_version="v", endpoint="e", model="m",
              mode="chat", status=status, chunks_total=1)
    session.add(job)
    session.flush()
    doc = Document(job_id=job.id, external_id=f"{name}-1", meta={"team": "red"})
    session.add(doc)
    session.flush()
    chunk = Chunk(job_id=job.id, document_id=doc.id, batch_seq=1, seq=0, text="x", char_start=0,
                  char_end=1, token_count=1)
    session.add(chunk)
    session.flush()
    session.add(Result(chunk_id=chunk.id, document_id=doc.id, job_id=job.id,
                       pipeline_version="v", status="ok", tokens_in=3, tokens_out=2))
    return int(job.id)


def test_jobs_list_newest_first_and_purge_leaves_none_of_a_jobs_rows(tmp_path: Path) -> None:
    # Given an embedded store with a finished job and a running one
    url = f"sqlite:///{tmp_path}/store.db"
    upgrade(url)
    sessions = make_sessionmaker(url)
    with sessions.begin() as s:
        done, running = add_job(s, "old", "succeeded"), add_job(s, "new", "running")
    # When the jobs are listed
    with sessions() as s:
        listed = list_jobs(s)
    # Then the newest comes first, with its progress and tokens counted from its results
    assert [(j.id, j.name, j.chunks_done, j.tokens) for j in listed] == [
        (running, "new", 1, 5), (done, "old", 1, 5)]
    # When the running job is purged, nothing happens; when the finished one is, it is gone
    with pytest.raises(InputError, match=f"job {running} is still running"), sessions.begin() as s:
        purge(s, [done, running])
    with sessions.begin() as s:
        report = purge(s, [done])
    # Then none of its rows are left and the other job's are all there
    assert (report.jobs, report.documents, report.chunks, report.results) == (1, 1, 1, 1)
    with sessions() as s:
        for table in (Document, Chunk, Result):
            counts = dict(s.execute(select(table.job_id, func.count()).group_by(table.job_id))
                          .all())
            assert counts == {running: 1}
        assert s.scalar(select(func.count()).select_from(Job)) == 1
