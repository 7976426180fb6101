"""Global rate limiting through whole jobs: real workers over Celery and Redis, the simulator,
PostgreSQL. Small per-minute limits keep every window a few seconds long.

What is checked is what a user would see: the provider's own counters (GET /stats of the
simulator), the result rows, the limiter's state as `docq status` shows it, and, where the
order of calls matters, a recording proxy between the workers and the simulator.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio
from aiohttp import ClientSession, ClientTimeout, web
from sqlalchemy import func, select

from docqueue.models import Chunk, Result
from docqueue.tasks import submit
from docqueue.tasks.limits import format_limiter_status, limiter_for, limiter_status
from docqueue.tasks.runtime import runtime
from docqueue.workers.batch.calls import prompt_tokens
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.provider.headers import retry_after_s
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MAX_TOKENS = 30


def notes(n: int) -> list[tuple[str, str]]:
    """n one-chunk documents whose requests all cost the same: 70 prompt tokens in chat mode."""
    text = "Note {}: the boats came back to the harbour at noon and sold their catch on the quay."
    docs = [(f"note-{i}", text.format(i)) for i in range(n)]
    pipe = build_pipeline("summarize", {})
    sizes = {prompt_tokens(pipe.render(text, "chat")) for _, text in docs}
    assert sizes == {70}, sizes
    return docs


COST = 70 + MAX_TOKENS  # what the provider charges a call at admission: prompt + max_tokens


def rows(job_id: int) -> list[Result]:
    with runtime().sessions() as s:
        return list(s.scalars(select(Result).where(Result.job_id == job_id)))


def chunk_count(job_id: int) -> int:
    with runtime().sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Chunk)
                            .where(Chunk.job_id == job_id)) or 0)


def status_429(stats: dict[str, Any]) -> int:
    return int(stats["by_status"].get("429", 0))


def busy_seconds(stats: dict[str, Any]) -> int:
    """Seconds from the first to the last second in which the provider answered anything."""
    seconds = [s["t"] for s in stats["per_second"] if s["requests"]]
    return max(seconds) - min(seconds) + 1


def envelope_used(stats: dict[str, Any], used: float, limit: int) -> float:
    """`used` as a share of what the provider's bucket allowed over the job's busy seconds:
    the full bucket plus its refill. 1.0 is every token the provider would have admitted."""
    return used / (limit + limit * busy_seconds(stats) / 60)


def steady_calls_per_minute(stats: dict[str, Any], after_s: int = 8) -> float:
    """Calls answered per minute once the first full bucket is spent (from `after_s` after the
    first call to the second before the last, which may be partial)."""
    seconds = {s["t"]: s["requests"] for s in stats["per_second"]}
    active = [t for t, n in seconds.items() if n]
    window = range(min(active) + after_s, max(active))
    assert len(window) >= 10, "the job ended too soon to have a steady part"
    return 60 * sum(seconds.get(t, 0) for t in window) / len(window)


def worst_window_excess(per_second: list[dict[str, Any]], cost: float, limit: int) -> float:
    """The most that what was sent, at `cost` per request, exceeds the provider's bucket
    (capacity `limit`, refilled at limit per minute) over any window of whole seconds."""
    series = {s["t"]: s["requests"] for s in per_second}
    ts = range(min(series), max(series) + 1)
    counts = [series.get(t, 0) for t in ts]
    worst = -float("inf")
    for i in range(len(counts)):
        sent = 0
        for j in range(i, len(counts)):
            sent += counts[j]
            worst = max(worst, sent * cost - (limit + limit * (j - i + 1) / 60))
    return worst


# -- the budget is shared and used ---------------------------------------------------------


def test_four_processes_share_one_budget_near_its_limit_with_almost_no_429s(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider allowing 9,000 tokens a minute (90 calls of 100 tokens: the binding
    # limit) and 120 requests, docqueue told the same, and 2 workers x 2 processes
    tpm, rpm = 9000, 120
    sim = simulator("--rpm", str(rpm), "--tpm", str(tpm), "--latency-ms", "50", "--seed", "11")
    env = docq_env(sim.url, llm_rpm=rpm, llm_tpm=tpm, llm_max_tokens=MAX_TOKENS,
                   chunk_tokens=60, chunk_overlap_tokens=0, batch_max_chunks=10)
    workers(env)
    workers(env)
    # When a job of 120 calls runs: 90 fit the full bucket, the other 30 need 20 s of refill
    handle = submit(notes(120), "summarize")
    final = handle.wait(timeout=90)
    # Then every chunk succeeded at its first attempt and the provider refused (almost) nothing
    assert final["status"] == "succeeded", final
    results = rows(handle.id)
    assert len(results) == 120 and all(r.status == "ok" for r in results)
    stats = sim.stats()
    assert status_429(stats) <= 0.01 * stats["requests_total"], stats["by_status"]
    assert stats["tokens_admitted"] == 120 * COST
    # and what docqueue sent, refused calls included, fits the provider's bucket over every
    # window (one call of slack for the seconds' edges), in tokens and in requests
    assert worst_window_excess(stats["per_second"], COST, tpm) <= COST
    assert worst_window_excess(stats["per_second"], 1, rpm) <= 1
    # (How close to the limit it runs is a speed target: benchmarks/bench_ratelimit.py measures
    # it, at 0.9999 of TPM; a timed test on a shared machine would only be flaky.)


def test_calls_waiting_for_an_in_flight_slot_wait_in_the_worker_not_in_the_queue(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given calls of a second, an in-flight cap of 3, and waits for rate-limit budget longer
    # than 0.2 s sent back to the queue; 4 batches of 4 on the default worker
    sim = simulator("--latency-ms", "1000", "--seed", "12")
    env = docq_env(sim.url, llm_max_inflight=3, limiter_max_wait_s=0.2, llm_max_tokens=MAX_TOKENS,
                   llm_adaptive_concurrency="off", batch_max_chunks=4, chunk_overlap_tokens=0)
    worker = workers(env)
    # When a job of 16 calls runs: most of them wait seconds for a slot
    handle = submit(notes(16), "summarize")
    final = handle.wait(timeout=90)
    # Then they waited in the worker: never more than 3 in flight, each batch taken once and
    # never sent back to the queue, every chunk done at its first attempt
    assert final["status"] == "succeeded", final
    assert sim.stats()["peak_in_flight"] <= 3
    log = worker.log()
    assert len(re.findall(r"Task batches\.process\[[^]]+\] received", log)) == 4, log[-3000:]
    assert "again in" not in log
    assert all(r.status == "ok" and r.attempts == 1 for r in rows(handle.id))


def test_limits_are_learned_from_the_providers_headers(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider allowing 90 requests a minute, and docqueue told no limits at all
    rpm, tpm = 90, 100_000
    sim = simulator("--rpm", str(rpm), "--tpm", str(tpm), "--latency-ms", "50", "--seed", "12")
    env = docq_env(sim.url, llm_max_tokens=MAX_TOKENS, chunk_tokens=60, chunk_overlap_tokens=0,
                   batch_max_chunks=10)
    workers(env)
    workers(env)
    # When a job of 120 calls runs (40 go out before the first answer comes back)
    handle = submit(notes(120), "summarize")
    final = handle.wait(timeout=90)
    # Then the limiter knows the provider's limits, as `docq status` shows them
    assert final["status"] == "succeeded", final
    status = limiter_status(runtime().settings)
    assert status["available"], status
    assert status["requests"]["learned"] == rpm and status["requests"]["configured"] is None
    assert status["tokens"]["learned"] == tpm and status["tokens"]["limit"] == tpm
    text = format_limiter_status(status)
    assert f"of {rpm} (learned from the provider)" in text, text
    # and the provider refused (almost) nothing, though 30 calls had to wait for refill
    stats = sim.stats()
    assert status_429(stats) <= 0.01 * stats["requests_total"], stats["by_status"]
    assert all(r.status == "ok" and r.attempts == 1 for r in rows(handle.id))
    assert steady_calls_per_minute(stats) >= 0.9 * rpm, stats["per_second"]
    used = envelope_used(stats, stats["by_status"]["200"], rpm)
    assert used >= 0.8, (used, busy_seconds(stats))


# -- a 429 pauses every process ------------------------------------------------------------


@dataclass
class Call:
    key: str  # the chunk's text, as sent
    sent_s: float  # when the proxy received the request
    answered_s: float  # when the proxy passed the answer back
    status: int
    retry_after_s: float | None


class RecordingProxy:
    """An HTTP proxy in front of the simulator that records every completion call."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.calls: list[Call] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._http: ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> RecordingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._http = ClientSession(timeout=ClientTimeout(total=60))
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _forward(self, request: web.Request) -> web.Response:
        sent = time.time()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "accept-encoding")}
        assert self._http is not None
        async with self._http.request(request.method, self.upstream + request.path_qs[3:],
                                      data=body, headers=headers) as answer:
            payload = await answer.read()
            back = {k: v for k, v in answer.headers.items() if k.lower() not in
                    ("content-length", "content-encoding", "transfer-encoding", "connection")}
        if request.path.endswith("/completions"):
            messages = json.loads(body).get("messages") or [{"content": ""}]
            self.calls.append(Call(messages[-1]["content"], sent, time.time(), answer.status,
                                   retry_after_s(back)))
        return web.Response(status=answer.status, body=payload, headers=back)

    def stop(self) -> None:
        async def close() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._http is not None:
                await self._http.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def timeline(calls: list[Call], zero: float) -> str:
    """The calls one a line, in seconds from `zero`, for a failure message."""
    return "\n".join(
        f"{c.sent_s - zero:+8.3f} -> {c.answered_s - zero:+8.3f}  {c.status}"
        f"  retry-after {c.retry_after_s}  {c.key.split('Note ')[-1][:4]!r}"
        for c in calls
    )


@pytest.fixture
def proxy() -> Iterator[Any]:
    started: list[RecordingProxy] = []

    def start(upstream: str) -> RecordingProxy:
        p = RecordingProxy(upstream).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()




def test_a_429_pauses_every_process_and_no_chunk_retries_before_retry_after(
    simulator: Any, docq_env: Any, workers: Any, proxy: Any
) -> None:
    # Given a provider allowing 30 requests a minute (one per 2 s once the bucket is empty),
    # slow answers (3 s), and docqueue wrongly told 300: its first wave of 36 calls (4 batches
    # of 9) overflows the provider's bucket. (The first answer would teach docqueue the
    # provider's limit: the 3 s leave the four processes time to send the wave before it, even
    # on a loaded machine, and the 6 calls over leave room for a refill or two meanwhile.)
    sim = simulator("--rpm", "30", "--latency-ms", "3000", "--seed", "13")
    recorder = proxy(sim.url)
    env = docq_env(recorder.url, llm_rpm=300, llm_max_tokens=MAX_TOKENS, chunk_tokens=60,
                   chunk_overlap_tokens=0, batch_max_chunks=9, max_attempts=10)
    workers(env)
    workers(env)
    # When a job of 38 chunks runs (a fifth batch of 2 waits for a free process)
    handle = submit(notes(38), "summarize")
    final = handle.wait(timeout=90)
    # Then every chunk succeeded in the end
    assert final["status"] == "succeeded", final
    assert all(r.status == "ok" for r in rows(handle.id))
    calls = sorted(recorder.calls, key=lambda c: c.sent_s)
    refused = [c for c in calls if c.status == 429]
    assert refused, "the first wave should have overflowed the provider's bucket"
    assert all(c.retry_after_s is not None for c in refused)
    # and after a 429 with Retry-After R no process sent anything for R (calls that were
    # already on their way when the 429 came back are allowed half a second to arrive)
    for r in refused:
        assert r.retry_after_s is not None
        during = [c for c in calls
                  if r.answered_s + 0.5 <= c.sent_s < r.answered_s + r.retry_after_s - 0.05]
        assert not during, (r, during)
    # and only that first wave was refused: nothing sent after the first pause got a 429
    first_pause = min(c.answered_s for c in refused)
    assert all(c.sent_s < first_pause + 0.5 for c in refused), timeline(calls, first_pause)
    # and no chunk was sent again before the Retry-After of its own 429
    by_chunk: dict[str, list[Call]] = defaultdict(list)
    for c in calls:
        by_chunk[c.key].append(c)
    for key, tries in by_chunk.items():
        for before, after in itertools.pairwise(tries):
            assert before.status == 429, (key, tries)
            assert before.retry_after_s is not None
            assert after.sent_s >= before.answered_s + before.retry_after_s, (key, tries)
    # and the attempts on the result rows are the calls the provider saw
    assert sorted(r.attempts for r in rows(handle.id)) == sorted(
        len(t) for t in by_chunk.values())


def test_a_429_teaches_the_providers_limit_before_the_pause_ends(
    simulator: Any, docq_env: Any, workers: Any, proxy: Any
) -> None:
    # Given a provider allowing 30 requests a minute whose bucket someone else has just emptied
    # (30 calls of another client, answered slowly), and docqueue wrongly told 300
    sim = simulator("--rpm", "30", "--latency-ms", "3000", "--seed", "17")

    async def drain() -> None:
        async with ClientSession(timeout=ClientTimeout(total=30)) as http:
            async def one(i: int) -> None:
                body = {"model": "docq-sim", "max_tokens": 5,
                        "messages": [{"role": "user", "content": f"another client {i}"}]}
                async with http.post(f"{sim.url}/chat/completions", json=body) as answer:
                    assert answer.status == 200, await answer.text()
            await asyncio.gather(*(one(i) for i in range(30)))

    recorder = proxy(sim.url)
    env = docq_env(recorder.url, llm_rpm=300, llm_max_tokens=MAX_TOKENS, chunk_tokens=60,
                   chunk_overlap_tokens=0, batch_max_chunks=2, max_attempts=10)
    workers(env)
    workers(env)
    asyncio.run(drain())  # 3 s: the bucket refills by 1.5 calls meanwhile, 8 are about to come
    # When a job of 8 chunks runs (four batches of 2, one a process): its first calls are
    # refused before any of them is answered, so only the 429s themselves can say the limit
    handle = submit(notes(8), "summarize")
    final = handle.wait(timeout=90)
    # Then every chunk succeeded in the end
    assert final["status"] == "succeeded", final
    assert all(r.status == "ok" for r in rows(handle.id))
    calls = sorted(recorder.calls, key=lambda c: c.sent_s)
    refused = [c for c in calls if c.status == 429]
    assert refused, "the provider's bucket was empty: the first calls should have been refused"
    first_pause = min(c.answered_s for c in refused)
    # and after the pause docqueue sent at the provider's pace (one call a refill, learned
    # from the 429s' x-ratelimit-* headers), so no call sent after it was refused again
    # (calls already on their way when the first 429 came back are allowed half a second)
    assert all(c.sent_s < first_pause + 0.5 for c in refused), timeline(calls, first_pause)
    assert len({c.key for c in refused}) == len(refused), timeline(calls, first_pause)


def test_a_lower_limit_learned_after_a_cool_down_leaves_the_bucket_empty_not_in_debt(
    docq_env: Any,
) -> None:
    # Given a worker's limiter told 600 requests a minute, two calls out, and the second
    # refused with a 1 s Retry-After (so every process cools down and the bucket is emptied)
    docq_env("http://127.0.0.1:9/v1", llm_rpm=600)
    rt = runtime()
    limiter = rt.services().limiter
    assert limiter is not None

    async def scenario() -> float:
        first = await limiter.acquire(100, max_wait_s=1)
        second = await limiter.acquire(100, max_wait_s=1)
        await limiter.release(second, refund=True)
        await limiter.cool_down(1.0)
        # When the first call's answer says the provider's limit is 30 a minute
        await limiter.settle(first, 100, headers={
            "x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "29"})
        await asyncio.sleep(1.1)
        # Then, once the cool-down is over, the next call waits for one request's refill
        # (2 s at 30 a minute), not for 570 requests of the old scale to refill (19 minutes)
        asked = time.monotonic()
        await limiter.acquire(100, max_wait_s=5)
        return time.monotonic() - asked

    assert rt.run(scenario()) <= 2.5


# -- retries: permanent errors once, transient ones up to the cap --------------------------


# A refused key (401) is a permanent error of the whole job, not of each chunk: its chunks not
# yet sent fail without a call (tests/integration/test_trouble.py).
@pytest.mark.parametrize(
    ("sim_args", "overrides", "http_status", "code"),
    [
        (("--context-limit", "40"), {}, 400, "context_length_exceeded"),
    ],
    ids=["400-context-length"],
)
def test_permanent_errors_are_never_retried(
    simulator: Any, docq_env: Any, workers: Any, sim_args: tuple[str, ...],
    overrides: dict[str, Any], http_status: int, code: str
) -> None:
    # Given a provider that refuses every call for a reason retrying cannot fix
    sim = simulator(*sim_args, "--seed", "14")
    env = docq_env(sim.url, llm_max_tokens=MAX_TOKENS, chunk_tokens=60, chunk_overlap_tokens=0,
                   batch_max_chunks=4, **overrides)
    workers(env)
    # When a job of 10 chunks runs
    handle = submit(notes(10), "summarize")
    final = handle.wait(timeout=60)
    # Then it failed, every chunk an error after exactly one call, with the provider's reason
    assert final["status"] == "failed", final
    results = rows(handle.id)
    assert len(results) == 10
    assert all(r.status == "error" and r.attempts == 1 and r.http_status == http_status
               for r in results), [(r.status, r.attempts, r.http_status) for r in results]
    assert all(code in (r.error_message or "") for r in results)
    assert sim.stats()["requests_total"] == 10


def test_transient_errors_stop_at_the_attempt_cap_with_the_last_error(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider whose every call fails with a 500, 502 or 503, and a cap of 3 attempts
    sim = simulator("--fail-rate", "1.0", "--seed", "15")
    env = docq_env(sim.url, llm_max_tokens=MAX_TOKENS, chunk_tokens=60, chunk_overlap_tokens=0,
                   batch_max_chunks=4, max_attempts=3)
    workers(env)
    # When a job of 8 chunks runs
    handle = submit(notes(8), "summarize")
    final = handle.wait(timeout=60)
    # Then every chunk is an error after exactly 3 calls, saying it gave up and why
    assert final["status"] == "failed", final
    results = rows(handle.id)
    assert len(results) == 8
    for r in results:
        assert r.status == "error" and r.attempts == 3, (r.status, r.attempts)
        assert r.http_status in (500, 502, 503)
        assert (r.error_message or "").startswith(
            f"gave up after 3 attempts; last error: HTTP {r.http_status}"), r.error_message
    stats = sim.stats()
    assert stats["requests_total"] == 3 * 8
    assert set(stats["by_status"]) <= {"500", "502", "503"}


# -- what `docq status` shows ----------------------------------------------------------------


def test_status_shows_what_the_workers_limiter_holds(docq_env: Any) -> None:
    # Given the limiter a worker process builds, after two calls were admitted, one settled
    # with the provider's headers and a 429 put everyone on a 30 s cool-down
    env = docq_env("http://127.0.0.1:9/v1", llm_rpm=1200, llm_tpm=150_000)
    assert env["DOCQ_LLM_RPM"] == "1200"
    rt = runtime()
    limiter = rt.services().limiter
    assert limiter is not None

    async def use() -> None:
        first = await limiter.acquire(400, max_wait_s=1)
        await limiter.acquire(300, max_wait_s=1)
        await limiter.settle(first, 400, headers={
            "x-ratelimit-limit-requests": "1000", "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "998", "x-ratelimit-remaining-tokens": "149300"})
        await limiter.cool_down(30)

    rt.run(use())
    # When `docq status` reads the limiter from another process's point of view
    status = limiter_status(rt.settings)
    # Then it sees the same numbers, as JSON
    json.dumps(status)
    assert status["available"] and status["scope"] == limiter.scope
    assert status["requests"] == {**status["requests"], "used": 2, "limit": 1000,
                                  "configured": 1200, "learned": 1000}
    # (tokens count once a call is settled: the one still in flight is not in yet)
    assert status["tokens"]["used"] == 400 and status["tokens"]["limit"] == 150_000
    assert status["inflight"] == 1 and status["max_inflight"] == 256
    assert 29 < status["cool_down_s"] <= 30
    # and in words
    lines = format_limiter_status(status).splitlines()
    assert lines[1:] == [
        "  requests/min: used 2 of 1,000 (learned from the provider; configured 1,200)",
        "  tokens/min: used 400 of 150,000 (configured)",
        "  in flight: 1 of 256",
        f"  cool-down: {status['cool_down_s']:.1f} s left",
    ], lines


def test_status_of_an_unused_limiter_and_of_an_unreachable_redis(docq_env: Any) -> None:
    # Given settings with limits but a limiter no worker has used yet
    docq_env("http://127.0.0.1:9/v1", llm_rpm=60)
    # When the status is read
    text = format_limiter_status(limiter_status(runtime().settings))
    # Then it shows nothing used, no cool-down, and an unknown token limit as such
    assert "requests/min: used 0 of 60 (configured)" in text
    assert "tokens/min: used 0 (no limit configured or learned yet)" in text
    assert "cool-down: none" in text
    # Given a Redis URL with a password that nothing listens on
    docq_env("http://127.0.0.1:9/v1", broker_url="redis://:s3cret-pw@127.0.0.1:9/0")
    # When the status is read
    status = limiter_status(runtime().settings)
    # Then it says Redis cannot be reached, without the password and without raising
    assert status["available"] is False
    assert "cannot read the limiter from Redis at redis://:***@127.0.0.1:9/0" in status["reason"]
    assert "s3cret-pw" not in json.dumps(status)
    assert "unavailable: cannot read the limiter" in format_limiter_status(status)


def test_status_builds_the_same_limiter_as_the_workers(docq_env: Any) -> None:
    # Given a worker's runtime and the status module's limiter for the same settings
    docq_env("http://127.0.0.1:9/v1/", llm_rpm=60, llm_tpm=6000, llm_api_key="k-123456")
    rt = runtime()
    worker_limiter = rt.services().limiter
    assert worker_limiter is not None
    # When the status module builds its own
    client = redis.asyncio.Redis.from_url(rt.settings.broker_url or "")
    mine = limiter_for(rt.settings, client, "http://127.0.0.1:9/v1/")
    rt.run(client.aclose())
    # Then both use the same scope and limits, and the scope carries no key
    assert mine.scope == worker_limiter.scope and mine.limits == worker_limiter.limits
    assert "k-123456" not in mine.scope
