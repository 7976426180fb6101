"""The batch processor on its own: a fake model behind our `LLM` protocol, a store on SQLite.

These pin the rules of workers/batch/processing.py (and its calls.py and writer.py) that the
multi-process integration tests only show end to end: how many calls a chunk gets for each kind of
failure, what a stopped job records, that paid rows survive a store that refuses writes, and that a
final row stays final.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import (
    Chunk,
    Document,
    Job,
    JobStatus,
    Result,
    ResultStatus,
    make_sessionmaker,
    upgrade,
)
from docqueue.workers import keys
from docqueue.workers.batch import leases
from docqueue.workers.batch.guard import StopReason
from docqueue.workers.batch.processing import run_batch
from docqueue.workers.batch.services import Outcome, Services
from docqueue.workers.batch.writer import ResultWriter
from docqueue.workers.errors import (
    AuthenticationRefusedError,
    EndpointUnreachableError,
    PermanentLLMError,
    RateLimitedError,
    RetryableLLMError,
)
from docqueue.workers.ingest.sources import iter_documents
from docqueue.workers.jobs.submission import batch_ids, create_job, ingest
from docqueue.workers.pipelines import Prompt, build_pipeline
from docqueue.workers.provider.client import Completion, classify_status_error
from docqueue.workers.settings import Settings

# -- fakes of our own interfaces -------------------------------------------------------------


@dataclass
class FakeLLM:
    """The `LLM` protocol: answers each call with `answer(prompt, call_number)`."""

    answer: Callable[[Prompt, int], Completion | BaseException]
    calls: list[Prompt] = field(default_factory=list)

    async def complete(self, prompt: Prompt, *, max_tokens: int,
                       service_tier: str | None = None,
                       cache_key: str | None = None) -> Completion:
        self.calls.append(prompt)
        result = self.answer(prompt, len(self.calls))
        if isinstance(result, BaseException):
            raise result
        return result

    async def aclose(self) -> None:
        return None


class FakeRedis:
    """The commands the job guard uses, in memory."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def mget(self, *names: str) -> list[bytes | None]:
        return [self.data.get(key) for key in names]

    async def set(self, key: str, value: Any, nx: bool = False, ex: int | None = None) -> bool:
        if nx and key in self.data:
            return False
        self.data[key] = str(value).encode()
        return True

    async def incrby(self, key: str, amount: int) -> int:
        value = int(self.data.get(key, b"0")) + amount
        self.data[key] = str(value).encode()
        return value

    async def incrbyfloat(self, key: str, amount: float) -> float:
        value = float(self.data.get(key, b"0")) + amount
        self.data[key] = repr(value).encode()
        return value


def completion(text: str = "A short summary.", tokens_in: int = 20,
               tokens_out: int = 10) -> Completion:
    return Completion(text=text, finish_reason="stop", tokens_in=tokens_in,
                      tokens_out=tokens_out, latency_ms=1.0)


# -- a job in a SQLite store -----------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path}/store.db", llm_base_url="http://fake/v1",
                    llm_model="fake", llm_mode="chat", max_attempts=3,
                    retry_backoff_base_s=0.01, retry_backoff_max_s=1, worker_inflight=1)


@pytest.fixture
def sessions(settings: Settings) -> sessionmaker[Session]:
    upgrade(settings.database_url)
    return make_sessionmaker(settings.database_url)


def make_job(sessions: sessionmaker[Session], settings: Settings, n_docs: int,
             pipeline: str = "summarize", options: dict[str, Any] | None = None,
             **job: Any) -> tuple[int, int]:
    """A job of `n_docs` one-chunk documents in one batch: (job id, batch id)."""
    pipe = build_pipeline(pipeline, options or {})
    with sessions.begin() as s:
        job_id = create_job(s, settings, pipe, **job).id
    docs = [(f"d{i}", f"Document number {i} tells a short story about a harbour.")
            for i in range(n_docs)]
    ingest(sessions, settings, job_id, iter_documents(docs, max_bytes=10**6))
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING))
        (batch_id, _, _), = list(batch_ids(s, job_id))
    return job_id, batch_id


def services(sessions: sessionmaker[Session], settings: Settings, llm: FakeLLM,
             redis: FakeRedis | None = None) -> Services:
    return Services(sessions, settings, llm, None, asyncio.Semaphore(settings.worker_inflight),
                    redis=redis or FakeRedis(), endpoint="http://fake/v1")


def deliver(svc: Services, batch_id: int, times: int = 10) -> list[Outcome]:
    """Deliver the batch until it is done (a redelivery after each "retry")."""
    outcomes = []
    for n in range(times):
        outcome = asyncio.run(run_batch(svc, batch_id, f"test:{n}", budget_s=30))
        outcomes.append(outcome)
        if outcome.state != "retry":
            break
    return outcomes


def results(sessions: sessionmaker[Session], job_id: int) -> list[Result]:
    with sessions() as s:
        return list(s.scalars(select(Result).where(Result.job_id == job_id)
                              .order_by(Result.chunk_id)))


# -- attempts --------------------------------------------------------------------------------


def test_a_transient_error_is_tried_up_to_the_attempt_cap_then_recorded_with_the_last_error(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a model that always answers 500
    job_id, batch_id = make_job(sessions, settings, 1)
    llm = FakeLLM(lambda p, n: RetryableLLMError("HTTP 500: boom", http_status=500))
    # When the batch is delivered until it is done
    deliver(services(sessions, settings, llm), batch_id)
    # Then the chunk got max_attempts calls and one final error row that says so
    (row,) = results(sessions, job_id)
    assert len(llm.calls) == settings.max_attempts == 3
    assert row.status == ResultStatus.ERROR and row.attempts == 3
    assert row.error_message == "gave up after 3 attempts; last error: HTTP 500: boom"


def test_output_that_does_not_parse_is_tried_twice_only(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given an extract job whose model never returns JSON
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    job_id, batch_id = make_job(sessions, settings, 1, "extract", {"schema": schema})
    llm = FakeLLM(lambda p, n: completion("not json at all"))
    deliver(services(sessions, settings, llm), batch_id)
    # Then the parse cap (2) applies before the attempt cap (3)
    (row,) = results(sessions, job_id)
    assert len(llm.calls) == 2
    assert row.status == ResultStatus.ERROR and row.attempts == 2
    assert row.error_message.startswith("gave up after 2 attempts; last error: extract:")


def test_a_permanent_error_is_recorded_at_once(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    job_id, batch_id = make_job(sessions, settings, 2)
    llm = FakeLLM(lambda p, n: PermanentLLMError("HTTP 400 context_length_exceeded: too long",
                                                 http_status=400, code="context_length_exceeded"))
    deliver(services(sessions, settings, llm), batch_id)
    rows = results(sessions, job_id)
    assert len(llm.calls) == 2
    assert [(r.status, r.attempts, r.http_status) for r in rows] == [("error", 1, 400)] * 2


def test_a_refused_connection_is_not_an_attempt_and_the_batch_waits(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given an endpoint that refuses connections for the first three calls, then answers
    job_id, batch_id = make_job(sessions, settings, 2)
    refused = EndpointUnreachableError("could not connect to http://fake/v1 (connection refused)",
                                       code="connection_refused")
    llm = FakeLLM(lambda p, n: refused if n <= 3 else completion())
    svc = services(sessions, settings, llm)
    # When the batch is delivered
    first = asyncio.run(run_batch(svc, batch_id, "test:0", budget_s=30))
    # Then the delivery stops at the first refusal and asks to come back, naming why
    assert first.state == "retry" and first.reason == str(refused)
    assert 0.5 <= first.retry_in_s <= 1.0
    assert len(llm.calls) == 1 and results(sessions, job_id) == []
    # and the later deliveries succeed with every chunk at attempt 1: no refusal was counted
    deliver(svc, batch_id)
    assert [(r.status, r.attempts) for r in results(sessions, job_id)] == [("ok", 1)] * 2
    assert svc.endpoint_down.refusals == 0


def test_a_refused_key_fails_the_jobs_other_chunks_without_a_call(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a job of 4 chunks, one call in flight at a time, and an endpoint refusing the key
    job_id, batch_id = make_job(sessions, settings, 4)
    refused = classify_status_error(status_error(401, "invalid_api_key"), "sk-secret")
    llm = FakeLLM(lambda p, n: refused)
    redis = FakeRedis()
    # When the batch is delivered
    (outcome,) = deliver(services(sessions, settings, llm, redis), batch_id)
    # Then one call was made, and every chunk failed at once with the refusal's words
    assert outcome.state == "done" and len(llm.calls) == 1
    rows = results(sessions, job_id)
    assert {(r.status, r.error_type, r.error_message, r.http_status) for r in rows} == {
        ("error", "AuthenticationRefusedError",
         "the endpoint refused the API key (HTTP 401 invalid_api_key: status 401)", 401)}
    assert sorted(r.attempts for r in rows) == [0, 0, 0, 1]
    # and the job is stopped for every other process, the refusal kept beside the flag
    assert redis.data[keys.job_stop(job_id)] == StopReason.REFUSED.encode()
    assert b"invalid_api_key" in redis.data[keys.job_refusal(job_id)]


def test_a_refusal_does_not_outlast_docq_retry(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a job whose key was refused in this process, its stop flag lifted (`docq retry`)
    job_id, batch_id = make_job(sessions, settings, 2)
    redis = FakeRedis()
    svc = services(sessions, settings, FakeLLM(lambda p, n: completion()), redis)
    svc.refused.add(job_id)
    # When the batch is delivered
    deliver(svc, batch_id)
    # Then its chunks are called and answered, and the process forgot the refusal
    assert [r.status for r in results(sessions, job_id)] == ["ok", "ok"]
    assert job_id not in svc.refused


# -- stopping: budget, cancel ----------------------------------------------------------------


def test_a_spent_budget_skips_the_rest_and_overshoots_by_at_most_the_calls_in_flight(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a job of 5 chunks with a budget of 50 tokens and calls costing 30 each
    job_id, batch_id = make_job(sessions, settings, 5, budget_tokens=50)
    llm = FakeLLM(lambda p, n: completion(tokens_in=20, tokens_out=10))
    redis = FakeRedis()
    deliver(services(sessions, settings, llm, redis), batch_id)
    # Then two calls were made (the second crossed the budget), the rest skipped
    rows = results(sessions, job_id)
    assert len(llm.calls) == 2
    assert [r.status for r in rows].count(ResultStatus.OK) == 2
    assert [r.status for r in rows].count(ResultStatus.SKIPPED_BUDGET) == 3
    assert redis.data[keys.job_stop(job_id)] == StopReason.BUDGET.encode()


def test_a_cancelled_job_makes_no_call_and_records_every_chunk_cancelled(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    job_id, batch_id = make_job(sessions, settings, 3)
    redis = FakeRedis()
    asyncio.run(redis.set(keys.job_stop(job_id), StopReason.CANCELLED))
    llm = FakeLLM(lambda p, n: completion())
    deliver(services(sessions, settings, llm, redis), batch_id)
    assert llm.calls == []
    assert {r.status for r in results(sessions, job_id)} == {ResultStatus.CANCELLED}


# -- the poison guard ------------------------------------------------------------------------


def leased_by_the_dead(sessions: sessionmaker[Session], job_id: int, docs: list[int],
                       **record: int) -> list[int]:
    """Lease chunks of documents d<i> to a delivery that died (its lease expired: the test's
    deliveries have no heartbeat), with `record` (deaths, deaths_alone, leased_alone) set;
    their chunk ids."""
    with sessions.begin() as s:
        ids = list(s.scalars(select(Chunk.id).join(Document, Document.id == Chunk.document_id)
                             .where(Chunk.job_id == job_id,
                                    Document.external_id.in_([f"d{i}" for i in docs]))))
        s.execute(update(Chunk).where(Chunk.id.in_(ids)).values(
            lease_owner="dead:1", lease_expires_at=leases.now() - timedelta(seconds=1),
            **record))
    return ids


def called_documents(llm: FakeLLM) -> list[int]:
    """The document (d<i>) of each call, in order."""
    return [int(m.group(1)) for p in llm.calls
            if (m := re.search(r"Document number (\d+)", repr(p)))]


def test_the_chunks_a_dead_delivery_held_are_counted_and_suspects_worked_alone_after_the_others(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a batch of four chunks, two of them held by a delivery that died, one of those
    # already in flight in an earlier death
    job_id, batch_id = make_job(sessions, settings, 4)
    (twice,) = leased_by_the_dead(sessions, job_id, [0], deaths=1)
    (once,) = leased_by_the_dead(sessions, job_id, [1])
    llm = FakeLLM(lambda p, n: completion())
    # When the batch is delivered
    (outcome,) = deliver(services(sessions, settings, llm), batch_id)
    # Then every chunk is ok; the one in flight in two deaths (a suspect) is called after the
    # others, the one in flight in one death with its batch
    assert outcome.state == "done"
    assert {r.status for r in results(sessions, job_id)} == {ResultStatus.OK}
    assert called_documents(llm) == [1, 2, 3, 0]
    # and a death is counted on each chunk the dead delivery held, none on the others
    with sessions() as s:
        deaths = {r.id: r.deaths for r in s.execute(select(Chunk.id, Chunk.deaths)
                                                     .where(Chunk.job_id == job_id))}
    assert deaths[twice] == 2 and deaths[once] == 1
    assert sorted(deaths.values()) == [0, 0, 1, 2]


def test_a_chunk_whose_worker_died_max_deliveries_times_once_alone_is_failed_alone(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a chunk whose workers died max_deliveries - 1 times, the last with it alone, and
    # now a delivery holding it alone died too
    job_id, batch_id = make_job(sessions, settings, 3)
    leased_by_the_dead(sessions, job_id, [1], deaths=settings.max_deliveries - 1,
                       deaths_alone=1, leased_alone=True)
    llm = FakeLLM(lambda p, n: completion())
    # When the batch is delivered
    (outcome,) = deliver(services(sessions, settings, llm), batch_id)
    # Then that chunk is failed without a call, naming it and its deaths; the others are ok
    assert outcome.state == "done"
    assert called_documents(llm) == [0, 2]
    rows = results(sessions, job_id)
    assert [r.status for r in rows] == [ResultStatus.OK, ResultStatus.ERROR, ResultStatus.OK]
    with sessions() as s:
        doc = s.scalar(select(Document.id).where(Document.job_id == job_id,
                                                 Document.external_id == "d1"))
    assert rows[1].error_type == "PoisonChunk"
    assert rows[1].error_message.startswith(
        f"document {doc} chunk 0: the worker handling it died {settings.max_deliveries} times "
        f"(2 with this chunk alone in flight")


def test_a_chunk_that_never_died_alone_is_not_failed_however_often_its_batch_died(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a chunk whose worker died max_deliveries times, always with its whole batch
    job_id, batch_id = make_job(sessions, settings, 2)
    leased_by_the_dead(sessions, job_id, [0], deaths=settings.max_deliveries - 1)
    llm = FakeLLM(lambda p, n: completion())
    # When the batch is delivered
    deliver(services(sessions, settings, llm), batch_id)
    # Then it is tried again, alone, and recorded ok
    assert {r.status for r in results(sessions, job_id)} == {ResultStatus.OK}
    assert called_documents(llm) == [1, 0]


# -- the result writer -----------------------------------------------------------------------


def test_the_writer_keeps_paid_rows_in_order_through_a_store_that_refuses_writes(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a store that refuses the first two flushes
    job_id, _ = make_job(sessions, settings, 3)
    svc = services(sessions, settings, FakeLLM(lambda p, n: completion()))
    real_db, refusals = svc.db, itertools.count()

    async def flaky_db(fn: Callable[[Session], Any]) -> Any:
        if next(refusals) < 2:
            raise OperationalError("INSERT", {}, Exception("the database system is starting up"))
        return await real_db(fn)

    svc.db = flaky_db  # type: ignore[method-assign]
    with sessions() as s:
        chunks = [(c.id, c.document_id) for c in s.scalars(
            select(leases.Chunk).where(leases.Chunk.job_id == job_id).order_by(leases.Chunk.id))]
    writer = ResultWriter(svc, "summarize-test")

    async def write() -> None:
        for n, (chunk_id, doc_id) in enumerate(chunks):
            row = leases.blank_result(chunk_id, job_id, doc_id, 1)
            row.update({"status": ResultStatus.OK, "output": {"summary": f"s{n}"}})
            writer.rows.append(row)
        await writer.flush()

    # When the rows are flushed
    asyncio.run(write())
    # Then all three are stored, none lost, after the store came back
    with sessions() as s:
        stored = s.execute(select(Result.chunk_id, Result.output).order_by(Result.chunk_id)).all()
    assert [(c, o["summary"]) for c, o in stored] == [
        (chunk_id, f"s{n}") for n, (chunk_id, _) in enumerate(chunks)]
    assert next(refusals) == 3  # two refused flushes, one that went through


def test_a_final_row_is_never_overwritten(
    sessions: sessionmaker[Session], settings: Settings,
) -> None:
    # Given a chunk whose result is final (ok)
    job_id, _ = make_job(sessions, settings, 1)
    with sessions() as s:
        chunk = s.scalars(select(leases.Chunk).where(leases.Chunk.job_id == job_id)).one()
    version = "summarize-test"
    ok = leases.blank_result(chunk.id, job_id, chunk.document_id, 1)
    ok.update({"status": ResultStatus.OK, "output": {"summary": "first"}})
    with sessions.begin() as s:
        leases.record(s, version, [ok])
    # When a late delivery writes an error, a retry and another answer for it
    for status, output in ((ResultStatus.ERROR, None), (ResultStatus.RETRY, None),
                           (ResultStatus.OK, {"summary": "second"})):
        late = leases.blank_result(chunk.id, job_id, chunk.document_id, 2)
        late.update({"status": status, "output": output})
        with sessions.begin() as s:
            leases.record(s, version, [late])
    # Then the first final row stands
    (row,) = results(sessions, job_id)
    assert (row.status, row.output, row.attempts) == ("ok", {"summary": "first"}, 1)


# -- the model client's mapping of statuses --------------------------------------------------


def status_error(status: int, code: str | None = None,
                 headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://fake/v1/chat/completions")
    body = {"error": {"message": f"status {status}", "type": "x", "code": code}}
    response = httpx.Response(status, json=body, headers=headers or {}, request=request)
    return openai.APIStatusError(f"status {status}", response=response, body=body["error"])


@pytest.mark.parametrize(("status", "code", "kind"), [
    (400, None, PermanentLLMError),
    (400, "context_length_exceeded", PermanentLLMError),
    (401, "invalid_api_key", AuthenticationRefusedError),
    (403, None, AuthenticationRefusedError),
    (404, "model_not_found", PermanentLLMError),
    (408, None, RetryableLLMError),
    (409, None, RetryableLLMError),
    (429, "rate_limit_exceeded", RateLimitedError),
    (429, "insufficient_quota", PermanentLLMError),
    (500, None, RetryableLLMError),
    (502, None, RetryableLLMError),
    (503, None, RetryableLLMError),
    (529, None, RetryableLLMError),
])
def test_each_status_maps_to_retry_or_not(status: int, code: str | None, kind: type) -> None:
    error = classify_status_error(status_error(status, code), "sk-secret")
    assert type(error) is kind
    assert error.http_status == status


def test_a_429_carries_the_providers_retry_after() -> None:
    error = classify_status_error(status_error(429, "rate_limit_exceeded",
                                               {"retry-after-ms": "1500"}), None)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after_s == pytest.approx(1.5)


def test_a_429_carries_the_providers_budget_headers_and_nothing_else() -> None:
    headers = {"retry-after-ms": "1500", "X-RateLimit-Limit-Requests": "30",
               "x-ratelimit-remaining-requests": "0", "set-cookie": "session=abc"}
    error = classify_status_error(status_error(429, "rate_limit_exceeded", headers), None)
    assert isinstance(error, RateLimitedError)
    assert {k.lower(): v for k, v in error.rate_headers.items()} == {
        "x-ratelimit-limit-requests": "30",
        "x-ratelimit-remaining-requests": "0"}


def test_a_poison_chunks_error_says_how_its_workers_died_when_their_supervisor_saw_it() -> None:
    from docqueue.workers.batch.leases import Suspect
    from docqueue.workers.batch.processing import poison_message

    # Given a chunk whose workers died 3 times, and what `docq worker` saw of 4 deaths of its
    # batch's deliveries (newest first)
    item = SimpleNamespace(document_id=12, level=0)
    suspect = Suspect(item, seq=2, deaths=3, deaths_alone=1)  # type: ignore[arg-type]
    causes = [f"worker process w00 (pid {p}) ended with SIGKILL" for p in (4, 3, 2, 1)]
    # When its error is written, with and without those causes
    seen, unseen = poison_message(suspect, causes), poison_message(suspect)
    # Then it names the chunk and the count, and the 3 newest deaths when known
    assert seen.startswith("document 12 chunk 2: the worker handling it died 3 times "
                           "(1 with this chunk alone in flight; ")
    assert "pid 4" in seen and "pid 2" in seen and "pid 1" not in seen
    assert "no supervisor saw how" in unseen and "SIGKILL" not in unseen
