"""The trouble line, on its own: its words for each cause, the record it is read back from, the
lines a plain view prints, what each failure counts as, and when a worker writes or clears it.

The integration tests (tests/integration/test_trouble.py) show it end to end; these pin the
words and the rules that decide them.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import redis
import sqlalchemy.exc
from celery.events.state import Task

from docqueue.tasks.batches import Waiting
from docqueue.tasks.cli.top import trouble_lines
from docqueue.tasks.failures import outage
from docqueue.tasks.flower import format_task
from docqueue.tasks.progress import TROUBLE_EVERY_S, TroubleLines
from docqueue.workers import keys
from docqueue.workers.batch import trouble as trouble_module
from docqueue.workers.batch.trouble import (
    STORM_CALLS,
    WRITE_EVERY_S,
    Cause,
    Outages,
    Trouble,
    TroubleLog,
    cause_of,
    cleared,
    doing,
    read,
    trouble,
)
from docqueue.workers.errors import PermanentLLMError, RetryableLLMError
from docqueue.workers.provider.client import classify_status, transport_error
from docqueue.workers.settings import Settings, public_url

ENDPOINT = "endpoint http://127.0.0.1:8000/v1"
NOW = 1_700_000_000.0


def refused() -> RetryableLLMError:
    return transport_error(ConnectionRefusedError(111, "Connection refused"),
                           "http://127.0.0.1:8000/v1", 60, None)


def http(status: int, code: str | None = None) -> RetryableLLMError | PermanentLLMError:
    body = {"error": {"message": f"status {status}", "code": code}}
    return classify_status(status, body, {}, "", "sk-secret-key")


# -- the words -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cause", "detail", "wait_s", "line"), [
    (Cause.UNREACHABLE, "connection refused", 7.2,
     f"{ENDPOINT} unreachable (connection refused) for 12 s, 5 failed calls; waiting, retrying "
     "every ~8 s"),
    (Cause.NO_CAPACITY, "HTTP 429 resource_unavailable", 3.0,
     f"{ENDPOINT} without capacity at the flex tier (HTTP 429 resource_unavailable) for 12 s, 5 "
     "failed calls; waiting, retrying every ~3 s"),
    (Cause.REFUSED_KEY, "HTTP 401 invalid_api_key", None,
     f"{ENDPOINT} refuses the API key (HTTP 401 invalid_api_key) for 12 s, 5 failed calls; the "
     "job's remaining chunks fail without a call; set DOCQ_LLM_API_KEY for the workers, then "
     "`docq retry 7`"),
    (Cause.RATE_LIMITED, "HTTP 429", 20.0,
     f"{ENDPOINT} rate-limiting (HTTP 429) for 12 s, 5 failed calls; every worker waits for its "
     "Retry-After (~20 s), then retries"),
    (Cause.SERVER_ERRORS, "HTTP 503", 0.4,
     f"{ENDPOINT} failing (HTTP 503) for 12 s, 5 failed calls; retrying each chunk with backoff "
     "(~1 s, at most 5 attempts)"),
    (Cause.TIMEOUTS, "timed out", None,
     f"{ENDPOINT} not answering (timed out) for 12 s, 5 failed calls; retrying each chunk with "
     "backoff (at most 5 attempts)"),
])
def test_the_line_names_the_service_the_cause_how_long_and_what_is_done(
    cause: Cause, detail: str, wait_s: float | None, line: str
) -> None:
    # Given five failures of one cause over twelve seconds, and docqueue's answer to them
    what = doing(cause, wait_s, max_attempts=5, job_id=7)
    # When the trouble is put in words
    found = trouble(cause, ENDPOINT, detail, since=NOW - 12, now=NOW, failures=5,
                    retry_s=wait_s, doing=what)
    # Then the line says all of it, in that order
    assert found["message"] == line
    assert found["for_s"] == 12.0 and found["since"] == "2023-11-14T22:13:08+00:00"


def test_a_first_look_says_no_time_and_a_single_failure_no_count() -> None:
    found = trouble(Cause.UNREACHABLE, ENDPOINT, "connection refused", since=NOW - 0.3,
                    now=NOW, failures=1, retry_s=1.0, doing="waiting, retrying every ~1 s")
    assert found["message"] == (f"{ENDPOINT} unreachable (connection refused); waiting, "
                                "retrying every ~1 s")


def test_long_troubles_read_in_minutes_and_hours() -> None:
    def line(for_s: float) -> str:
        return trouble(Cause.TIMEOUTS, ENDPOINT, "", since=NOW - for_s, now=NOW, failures=0,
                       retry_s=None, doing="")["message"]

    assert line(245) == f"{ENDPOINT} not answering for 4 min 05 s"
    assert line(7800) == f"{ENDPOINT} not answering for 2 h 10 min"


def test_a_record_read_back_from_redis_is_the_same_trouble_and_a_torn_one_none() -> None:
    # Given a record as a worker writes it
    record = json.dumps({"cause": "unreachable", "service": ENDPOINT,
                         "detail": "connection refused", "since": NOW - 30, "failures": 4,
                         "retry_s": 16.0, "doing": "waiting, retrying every ~16 s"}).encode()
    # When it is read at NOW / Then it says what the worker met, for how long
    found = read(record, NOW)
    assert found is not None and found["message"] == (
        f"{ENDPOINT} unreachable (connection refused) for 30 s, 4 failed calls; waiting, "
        "retrying every ~16 s")
    assert (found["retry_s"], found["failures"]) == (16.0, 4)
    # and no record, or one torn or missing its cause or time, is no trouble
    assert read(None, NOW) is None
    assert read(b"{not json", NOW) is None
    assert read(b"[]", NOW) is None
    assert read(json.dumps({"cause": "unreachable", "service": "x"}), NOW) is None


def test_a_cause_of_a_newer_worker_still_reads() -> None:
    found = trouble("quota_gone", ENDPOINT, "HTTP 402", since=None, now=NOW, failures=0,
                    retry_s=None, doing="")
    assert found["message"] == f"{ENDPOINT} quota gone (HTTP 402)"


def test_a_cleared_trouble_names_what_is_over_and_how_long_it_lasted() -> None:
    gone = trouble(Cause.UNREACHABLE, ENDPOINT, "connection refused", since=NOW - 3, now=NOW,
                   failures=2, retry_s=2.0, doing="waiting")
    assert cleared(gone, 23.4) == f"{ENDPOINT} (unreachable, connection refused) after 23 s"


# -- what each failure counts as ---------------------------------------------------------------


@pytest.mark.parametrize(("error", "found"), [
    (refused, (Cause.UNREACHABLE, "connection refused")),
    (lambda: transport_error(socket.gaierror(-2, "Name or service not known"),
                             "http://nowhere.invalid/v1", 60, None),
     (Cause.UNREACHABLE, "unknown host")),
    (lambda: classify_status(429, {"error": {"code": "resource_unavailable", "message": "x"}},
                             {}, "", None), (Cause.NO_CAPACITY, "HTTP 429 resource_unavailable")),
    (lambda: http(401, "invalid_api_key"), (Cause.REFUSED_KEY, "HTTP 401 invalid_api_key")),
    (lambda: http(403), (Cause.REFUSED_KEY, "HTTP 403")),
    (lambda: http(429, "rate_limit_exceeded"), (Cause.RATE_LIMITED, "HTTP 429")),
    (lambda: http(503), (Cause.SERVER_ERRORS, "HTTP 503")),
    (lambda: transport_error(TimeoutError(), "http://h/v1", 60, None),
     (Cause.TIMEOUTS, "timed out")),
    (lambda: transport_error(ConnectionResetError(), "http://h/v1", 60, None),
     (Cause.SERVER_ERRORS, "connections cut")),
    (lambda: http(400, "context_length_exceeded"), None),
    (lambda: http(429, "insufficient_quota"), None),
    (lambda: http(404, "model_not_found"), None),
])
def test_each_failure_counts_as_its_shared_cause_or_as_its_own(error: Any, found: Any) -> None:
    assert cause_of(error()) == found


def test_a_refused_key_is_said_once_in_its_own_words_without_the_key() -> None:
    body = {"error": {"message": "Incorrect API key provided: sk-secret-key.",
                      "code": "invalid_api_key"}}
    error = classify_status(401, body, {}, "", "sk-secret-key")
    assert str(error) == ("the endpoint refused the API key (HTTP 401 invalid_api_key: "
                          "Incorrect API key provided: [key].)")


# -- a worker's log of its failures ----------------------------------------------------------------


class FakeRedis:
    """The two things a TroubleLog asks of Redis: the write script, and a delete."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, list[Any]]] = []
        self.deleted: list[str] = []

    def register_script(self, _: str) -> Any:
        async def write(keys: list[str], args: list[Any]) -> None:
            self.writes.append((keys[0], args))
        return write

    async def delete(self, key: str) -> None:
        self.deleted.append(key)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The log's clock, moved by the test: [now]."""
    now = [100.0]
    monkeypatch.setattr(trouble_module, "monotonic_s", lambda: now[0])
    monkeypatch.setattr(trouble_module, "wall_s", lambda: NOW + now[0])
    return now


def test_an_unreachable_endpoint_is_written_at_the_first_refusal_then_once_a_second(
    clock: list[float],
) -> None:
    # Given a worker's log
    fake = FakeRedis()
    log = TroubleLog(fake, "http://127.0.0.1:8000/v1", max_attempts=5)

    async def run() -> list[Trouble | None]:
        said = [await log.failed(7, refused(), 1.0)]  # the first refusal
        clock[0] += 0.3
        said.append(await log.failed(7, refused(), 2.0))  # within a second of the write
        clock[0] += WRITE_EVERY_S
        said.append(await log.failed(7, refused(), 4.0))
        return said

    said = asyncio.run(run())
    # Then the first refusal is trouble at once and written, the second only counted, the
    # third written with it
    assert all(t is not None and t["cause"] == "unreachable" for t in said)
    written = [(key, json.loads(args[0]), args[1]) for key, args in fake.writes]
    assert [(key, r["cause"], r["since"], r["failures"], r["retry_s"], ttl)
            for key, r, ttl in written] == [
        (keys.job_trouble(7), "unreachable", NOW + 100.0, 1, 1.0, 17),
        (keys.job_trouble(7), "unreachable", NOW + 100.0, 2, 4.0, 23),
    ]
    assert written[-1][1]["service"] == ENDPOINT
    assert written[-1][1]["doing"] == "waiting, retrying every ~4 s"


def test_a_storm_is_trouble_at_its_third_failure_in_a_row_and_a_success_ends_a_run(
    clock: list[float],
) -> None:
    fake = FakeRedis()
    log = TroubleLog(fake, "http://127.0.0.1:8000/v1", max_attempts=5)

    async def run() -> list[bool]:
        made = []
        for _ in range(STORM_CALLS - 1):
            made.append(await log.failed(7, http(503), 0.5) is not None)
        await log.ok(7)  # a success between: the run starts over
        for _ in range(STORM_CALLS):
            made.append(await log.failed(7, http(503), 0.5) is not None)
        return made

    # Then only the third 503 in a row made trouble, and only it was written
    assert asyncio.run(run()) == [False, False, False, False, True]
    assert len(fake.writes) == 1 and fake.deleted == []


def test_a_success_clears_only_what_this_process_wrote_and_asks_redis_nothing_otherwise(
    clock: list[float],
) -> None:
    fake = FakeRedis()
    log = TroubleLog(fake, "http://127.0.0.1:8000/v1", max_attempts=5)

    async def run() -> None:
        await log.ok(7)  # no trouble: nothing asked of Redis
        await log.failed(8, http(400, "context_length_exceeded"), None)  # the chunk's own
        await log.ok(8)
        await log.failed(9, refused(), 1.0)
        await log.failed(9, http(503), 0.5)  # another cause, not yet a storm: the record stays
        await log.ok(9)

    asyncio.run(run())
    assert fake.deleted == [keys.job_trouble(9)]
    assert log.current(9) is None


def test_a_success_clears_a_record_another_process_wrote_once_the_guard_saw_it(
    clock: list[float],
) -> None:
    # Given a process that never met the job's trouble (its batch came back here after it)
    fake = FakeRedis()
    log = TroubleLog(fake, "http://127.0.0.1:8000/v1", max_attempts=5)
    # When a call succeeds after the job guard saw the record
    asyncio.run(log.ok(7, seen=True))
    # Then the record is deleted
    assert fake.deleted == [keys.job_trouble(7)]


def test_a_view_says_since_when_a_service_is_out_of_reach(clock: list[float]) -> None:
    outages = Outages()
    first = outages.failed("store", "the results store at db:5432", "connection refused")
    clock[0] += 12
    later = outages.failed("store", "the results store at db:5432", "connection refused")
    assert first["message"] == ("the results store at db:5432 unreachable (connection refused); "
                                "still waiting")
    assert later["message"] == ("the results store at db:5432 unreachable (connection refused) "
                                "for 12 s; still waiting")
    outages.reached("store")
    again = outages.failed("store", "the results store at db:5432", "connection refused")
    assert again["for_s"] == 0.0


# -- what the views print ------------------------------------------------------------------------


def a_trouble(for_s: float, cause: str = Cause.UNREACHABLE) -> Trouble:
    return trouble(cause, ENDPOINT, "connection refused", since=NOW - for_s, now=NOW,
                   failures=1, retry_s=2.0, doing="waiting, retrying every ~2 s")


def test_plain_lines_say_a_trouble_when_it_starts_while_it_lasts_and_when_it_is_over() -> None:
    view = TroubleLines()
    said = [
        view.lines(None, now=0.0),
        view.lines(a_trouble(1), now=1.0),  # it starts
        view.lines(a_trouble(5), now=5.0),  # it goes on: not again yet
        view.lines(a_trouble(1 + TROUBLE_EVERY_S), now=1.0 + TROUBLE_EVERY_S),  # said again
        view.lines(a_trouble(1, Cause.TIMEOUTS), now=12.0),  # another cause: said at once
        view.lines(None, now=20.0),  # over
        view.lines(None, now=21.0),
    ]
    assert said == [
        [],
        [f"trouble: {ENDPOINT} unreachable (connection refused) for 1 s; waiting, retrying "
         "every ~2 s"],
        [],
        [f"trouble: {ENDPOINT} unreachable (connection refused) for 11 s; waiting, retrying "
         "every ~2 s"],
        [f"trouble: {ENDPOINT} not answering (connection refused) for 1 s; waiting, retrying "
         "every ~2 s"],
        [f"trouble cleared: {ENDPOINT} (not answering, connection refused) after 9 s"],
        [],
    ]


def test_top_says_each_shared_trouble_once_naming_its_jobs() -> None:
    jobs: list[Any] = [{"id": 3, "trouble": a_trouble(40)}, {"id": 4, "trouble": None},
                       {"id": 5, "trouble": a_trouble(12)}]
    assert trouble_lines(jobs) == [
        f"trouble (jobs 3, 5): {ENDPOINT} unreachable (connection refused) for 40 s; waiting, "
        "retrying every ~2 s"]


def test_flower_shows_why_a_waiting_batch_waits() -> None:
    # Given a batch task retried with the trouble line as its words (tasks/batches.py)
    words = a_trouble(12)["message"]
    task = Task(uuid="u1", name="batches.process", state="RETRY", exception=repr(Waiting(words)))
    # When Flower formats it / Then its result column says why, in the status views' words
    shown = format_task(task)
    assert shown.result == f"waiting: {words}" and shown.exception == words


# -- names without secrets -----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:pw@api.example.com:8443/v1?api-key=k3y#frag", "https://api.example.com:8443/v1"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
    ("http://host:notaport/v1", "(an invalid URL)"),
])
def test_an_endpoint_is_shown_without_credentials_or_query(url: str, shown: str) -> None:
    assert public_url(url) == shown


def test_an_outage_of_the_store_or_redis_is_told_from_a_refusal_of_credentials() -> None:
    settings = Settings(database_url="postgresql://u:pw@db.example:5432/docq",
                        broker_url="redis://:pw@cache.example:6380/0")

    def store_error(words: str) -> sqlalchemy.exc.OperationalError:
        return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception(words))

    assert outage(redis.exceptions.ConnectionError(
        "Error 111 connecting to cache.example:6380. Connection refused."), settings) == (
        "docqueue's Redis at cache.example:6380", "connection refused")
    assert outage(store_error('connection to server at "db.example", port 5432 failed: '
                              "Connection refused"), settings) == (
        "the results store at db.example:5432", "connection refused")
    assert outage(store_error("server closed the connection unexpectedly"), settings) == (
        "the results store at db.example:5432", "connection lost")
    # and what waiting cannot mend is not an outage
    assert outage(store_error('password authentication failed for user "u"'), settings) is None
    assert outage(store_error('relation "jobs" does not exist'), settings) is None
    assert outage(redis.exceptions.AuthenticationError("invalid password"), settings) is None
    assert outage(ValueError("boom"), settings) is None
