"""Jobs end to end on the default local model: real Celery workers call Gemma 3 270M, served by
llama_cpp.server on loopback, in completion mode, and the results are merged into PostgreSQL.

A 270M base model on two shared cores answers in about a second a call; these tests take tens
of seconds, most of it starting the worker and the model server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from docqueue.models import Result
from docqueue.tasks import submit
from docqueue.tasks.runtime import runtime
from docqueue.workers.local import DEMO_CORPUS
from docqueue.workers.local.model import LocalModelServer
from docqueue.workers.settings import LOCAL_MODEL_NAME
from tests.integration.test_localmodel import require_local_extra

pytestmark = [pytest.mark.integration, pytest.mark.local_model]

CORPUS = DEMO_CORPUS
TOPICS = ["sports", "politics", "technology", "cooking", "science", "travel"]
# Four texts of the demo corpus and the topic a reader gives each.
LABELLED = {
    "cup-final-penalties.txt": "sports",
    "election-debate.md": "politics",
    "sourdough-starter.txt": "cooking",
    "sleep-and-memory.txt": "science",
}


@pytest.fixture
def local_model(tmp_path: Path) -> Iterator[LocalModelServer]:
    """The local model server of the test's docq home, stopped at the end."""
    require_local_extra()  # skips locally, fails under CI=true (which installs the extra)
    started = time.perf_counter()
    server = LocalModelServer(tmp_path / "home").start()
    print(f"\nlocal model server ready in {time.perf_counter() - started:.1f} s at {server.url}")
    try:
        yield server
    finally:
        server.stop()


def local_job_env(server: LocalModelServer, docq_env: Any) -> dict[str, str]:
    env: dict[str, str] = docq_env(
        server.url, llm_mode="completion", llm_model=LOCAL_MODEL_NAME, worker_inflight=2
    )
    return env


def corpus(*names: str) -> list[tuple[str, str]]:
    return [(name, (CORPUS / name).read_text()) for name in names]


def result_rows(job_id: int) -> list[Result]:
    with runtime().sessions() as session:
        return list(session.scalars(select(Result).where(Result.job_id == job_id)))


def test_a_summarize_job_runs_on_the_local_model(
    local_model: LocalModelServer, docq_env: Any, workers: Any
) -> None:
    # Given the local model, and a worker that calls it in completion mode
    env = local_job_env(local_model, docq_env)
    workers(env, concurrency=1)
    started = time.perf_counter()

    # When two short documents are summarized
    handle = submit(corpus("island-hopping.txt", "night-train-north.txt"), "summarize")
    final = handle.wait(timeout=180)
    print(f"summarize job: {final['status']} in {time.perf_counter() - started:.1f} s")

    # Then the job succeeded, and every chunk has an answer with the server's real token counts
    assert final["status"] == "succeeded", final
    rows = result_rows(handle.id)
    assert len(rows) == 2, [(r.status, r.error_message) for r in rows]
    for row in rows:
        print(
            f"  chunk {row.chunk_id}: {row.tokens_in} + {row.tokens_out} tokens, "
            f"{row.latency_ms:.0f} ms, {row.output}"
        )
        assert row.status == "ok" and row.attempts == 1, row.error_message
        assert row.tokens_in > 0 and row.tokens_out > 0
    assert final["tokens_in"] == sum(r.tokens_in for r in rows)
    # And each document has a one-sentence summary
    documents = list(handle.results())
    assert [d["id"] for d in documents] == ["island-hopping.txt", "night-train-north.txt"]
    for document in documents:
        summary = document["output"]["summary"]
        assert document["status"] == "ok" and len(summary.split()) >= 3, document
        assert summary.endswith((".", "!", "?")) and "\n" not in summary, summary


def test_a_classify_job_labels_every_document_from_the_list(
    local_model: LocalModelServer, docq_env: Any, workers: Any
) -> None:
    # Given the local model, and a worker that calls it in completion mode
    env = local_job_env(local_model, docq_env)
    workers(env, concurrency=1)
    started = time.perf_counter()

    # When four texts are classified by topic
    handle = submit(corpus(*LABELLED), "classify", labels=TOPICS)
    final = handle.wait(timeout=180)
    print(f"classify job: {final['status']} in {time.perf_counter() - started:.1f} s")

    # Then the job succeeded, with real token counts on every chunk
    assert final["status"] == "succeeded", final
    rows = result_rows(handle.id)
    assert len(rows) == 4 and all(r.tokens_in > 0 and r.tokens_out > 0 for r in rows)
    # And every document got a label from the list
    labels = {d["id"]: d["output"]["label"] for d in handle.results()}
    assert set(labels) == set(LABELLED)
    assert all(label in TOPICS for label in labels.values()), labels
    right = sum(labels[name] == topic for name, topic in LABELLED.items())
    print(f"  labels: {labels}; {right} of {len(LABELLED)} as a reader would label them")
