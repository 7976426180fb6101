"""The simulator's Batch API through the real OpenAI SDK: files, batches, their states and files."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from docqueue.workers.testing.simulator.process import SimulatorProcess
from tests.plugins.simulator import SimulatorFactory

pytestmark = pytest.mark.integration

MODEL = "docq-sim"
Client = Callable[[SimulatorProcess], openai.OpenAI]
CHAT = "/v1/chat/completions"


@pytest.fixture
def client() -> Iterator[Callable[[SimulatorProcess], openai.OpenAI]]:
    """OpenAI SDK clients for simulators, closed at teardown."""
    made: list[openai.OpenAI] = []

    def make(sim: SimulatorProcess) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=sim.url, api_key="x", max_retries=0))
        return made[-1]

    yield make
    for api in made:
        api.close()


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"summarise item {i}"}],
            "max_tokens": 40}


def batch_file(n: int) -> bytes:
    lines = [
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": CHAT, "body": body(i)})
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def submit(api: openai.OpenAI, n: int, **metadata: str) -> Any:
    uploaded = api.files.create(file=("in.jsonl", io.BytesIO(batch_file(n))), purpose="batch")
    return api.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata=metadata or None,
    )


def wait_for(api: openai.OpenAI, batch_id: str, states: set[str], timeout: float = 30,
             seen: list[str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = api.batches.retrieve(batch_id)
        if seen is not None:
            seen.append(batch.status)
        if batch.status in states or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)


def lines(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = api.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines()]


def test_a_batch_answers_like_the_online_endpoint(
    simulator: SimulatorFactory, client: Client
) -> None:
    sim = simulator("--seed", "1")
    api = client(sim)
    created = submit(api, 5, docq_ledger="7")
    assert created.status in ("validating", "in_progress", "completed")
    seen: list[str] = []
    done = wait_for(api, created.id, {"completed"}, seen=seen)
    assert done.status == "completed"
    assert seen[-2:] == ["finalizing", "completed"]
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (5, 5)
    assert done.request_counts.failed == 0
    assert done.error_file_id is None
    output = lines(api, done.output_file_id)
    assert [o["custom_id"] for o in output] == [f"c{i}" for i in range(5)]
    for i, out in enumerate(output):
        online = api.chat.completions.with_raw_response.create(**body(i)).http_response
        response = out["response"]
        assert response["status_code"] == 200
        assert response["body"]["choices"] == online.json()["choices"]
        assert response["body"]["usage"] == online.json()["usage"]
    assert api.batches.list().data[0].metadata == {"docq_ledger": "7"}


def test_expiry_keeps_the_lines_done_and_names_the_rest(
    simulator: SimulatorFactory, client: Client
) -> None:
    sim = simulator("--batch-turnaround-s", "5", "--batch-window-s", "3")
    api = client(sim)
    created = submit(api, 20)
    assert wait_for(api, created.id, {"in_progress"}).status == "in_progress"
    expired = wait_for(api, created.id, {"expired"})
    assert expired.status == "expired"
    assert expired.request_counts.completed == 12  # 3 s of 5: 60 %
    assert expired.expired_at is not None
    done = lines(api, expired.output_file_id)
    rest = lines(api, expired.error_file_id)
    assert [o["custom_id"] for o in done] == [f"c{i}" for i in range(12)]
    assert [e["custom_id"] for e in rest] == [f"c{i}" for i in range(12, 20)]
    assert {e["error"]["code"] for e in rest} == {"batch_expired"}
    assert all(e["response"] is None for e in rest)


def test_failed_lines_go_to_the_error_file(
    simulator: SimulatorFactory, client: Client
) -> None:
    sim = simulator("--batch-fail-rate", "0.5")
    api = client(sim)
    done = wait_for(api, submit(api, 40).id, {"completed"})
    counts = done.request_counts
    assert counts.completed + counts.failed == 40
    assert 5 < counts.failed < 35
    errors = lines(api, done.error_file_id)
    assert len(errors) == counts.failed
    assert {e["response"]["status_code"] for e in errors} == {500}
    assert len(lines(api, done.output_file_id)) == counts.completed


def test_cancel_keeps_what_had_completed(
    simulator: SimulatorFactory, client: Client
) -> None:
    sim = simulator("--batch-turnaround-s", "10")
    api = client(sim)
    created = submit(api, 50)
    wait_for(api, created.id, {"in_progress"})
    time.sleep(2)
    cancelling = api.batches.cancel(created.id)
    assert cancelling.status == "cancelling"
    cancelled = api.batches.retrieve(created.id)
    assert cancelled.status == "cancelled"
    kept = cancelled.request_counts.completed
    assert 5 <= kept < 50
    assert len(lines(api, cancelled.output_file_id)) == kept
    rest = lines(api, cancelled.error_file_id)
    assert {e["error"]["code"] for e in rest} == {"batch_cancelled"}
    assert len(rest) == 50 - kept
    stats = httpx_stats(sim)
    assert (stats["files_uploaded"], stats["batches_created"], stats["batches_cancelled"]) == (
        1, 1, 1)


def httpx_stats(sim: SimulatorProcess) -> dict[str, int]:
    return httpx.get(sim.root_url + "/stats/batches", timeout=5).json()


def test_the_enqueued_token_limit_fails_a_batch_with_openais_error(
    simulator: SimulatorFactory, client: Client
) -> None:
    sim = simulator("--batch-turnaround-s", "30", "--batch-enqueued-token-limit", "200")
    api = client(sim)
    first = wait_for(api, submit(api, 10).id, {"in_progress", "failed"})
    assert first.status == "in_progress"
    second = wait_for(api, submit(api, 10).id, {"in_progress", "failed"})
    assert second.status == "failed"
    assert second.errors is not None and second.errors.data
    error = second.errors.data[0]
    assert error.code == "token_limit_exceeded"
    assert error.message.startswith(f"Enqueued token limit reached for {MODEL}")


def test_files_over_the_request_limit_are_refused(
    simulator: SimulatorFactory, client: Client
) -> None:
    sim = simulator("--batch-max-requests", "3")
    api = client(sim)
    with pytest.raises(openai.BadRequestError, match="at most 3"):
        api.files.create(file=("in.jsonl", io.BytesIO(batch_file(4))), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_nope")
