"""Process one batch: call the model for each unfinished chunk and record one row per chunk.

Step 2 of the flow in docs/ARCHITECTURE.md. Runs inside the worker process's event loop; database work goes
to a thread so the loop keeps its calls in flight.

A delivery is alive while its heartbeat is (workers/batch/liveness.py): it registers before
its first claim and ends its heartbeat when it returns. Chunks held by a delivery whose
heartbeat is gone are claimed at once; a delivery whose own heartbeat lapsed (its process was
frozen or cut off from Redis for a TTL) starts no further call, hands its batch on, and what it
still writes is fenced by its lease: a result another delivery recorded is never overwritten
and its spend is not counted twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import JobStatus, ResultStatus, end_if_left_idle
from docqueue.workers import metrics
from docqueue.workers.batch import cache, leases
from docqueue.workers.batch.cache import CachePolicy
from docqueue.workers.batch.guard import JobGuard, StopReason
from docqueue.workers.batch.leases import BatchInfo, ResultRow, WorkItem
from docqueue.workers.batch.liveness import Heartbeat
from docqueue.workers.errors import (
    EndpointUnreachableError,
    PermanentError,
    RateLimitedError,
    RetryableError,
)
from docqueue.workers.pipelines import OutputParseError, Pipeline, Prompt, build_pipeline
from docqueue.workers.provider.limiter import Limiter, LimiterBusy
from docqueue.workers.provider.retry import EndpointDown, backoff_s
from docqueue.workers.settings import Settings
from docqueue.workers.tokens import count_tokens

if TYPE_CHECKING:  # the model client imports langchain-openai: a producer never needs it
    from docqueue.workers.provider.client import LLM, Completion

logger = logging.getLogger(__name__)

CANCELLED_MESSAGE = "the job was cancelled before this chunk's call"
INLINE_WAIT_S = 5.0  # a retry due sooner than this waits in the task; later ones re-queue it
MAX_PARSE_ATTEMPTS = 2  # output that does not parse comes back the same at temperature 0
FLUSH_ROWS, FLUSH_EVERY_S = 200, 0.25
HELD_POLL_S = 1.0
LAPSED_RETRY_S = 1.0  # a lapsed delivery's message comes back this soon, to find its batch taken


@dataclass(frozen=True)
class Outcome:
    """How a delivery ended: the batch is done, or it should run again after `retry_in_s`."""

    state: Literal["done", "retry", "missing"]
    retry_in_s: float = 0.0
    reason: str = ""


@dataclass
class Services:
    """What a batch needs from its worker process; built once per process."""

    sessions: sessionmaker[Session]
    settings: Settings
    llm: LLM
    limiter: Limiter | None
    inflight: asyncio.Semaphore
    redis: Any = None  # asyncio Redis: the job guard's stop flag and spend counters
    endpoint: str = ""
    heartbeat: Heartbeat | None = None  # None (a REPL, a unit test): leases expire, nothing else
    pipelines: dict[tuple[str, str], Pipeline] = field(default_factory=dict)
    endpoint_down: EndpointDown = field(default_factory=EndpointDown)
    # A delivery's first claim runs alone in its process: when a job starts, every open batch
    # claims at once, and the first calls waited for all of those claims to share the CPU.
    starting: asyncio.Lock = field(default_factory=asyncio.Lock)

    def pipeline(self, info: BatchInfo) -> Pipeline:
        key = (info.pipeline, info.pipeline_version)
        if key not in self.pipelines:
            self.pipelines[key] = build_pipeline(info.pipeline, info.options)
        return self.pipelines[key]

    async def db(self, fn: Callable[[Session], Any]) -> Any:
        """Run `fn(session)` in one transaction, off the event loop."""

        def run() -> Any:
            with self.sessions.begin() as session:
                # A delivery's transactions are a few statements with nothing in between; one
                # idle for a heartbeat's TTL is a frozen process's, whose locks would hold up
                # the deliveries taking its batch over.
                end_if_left_idle(session, self.settings.heartbeat_ttl_s)
                return fn(session)

        return await asyncio.to_thread(run)


def _store_unreachable(exc: DBAPIError) -> bool:
    """The store could not be reached or dropped the connection (a restart, or a transaction
    it ended after this process was frozen in it): the same write may succeed again."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


class _Writer:
    """Collects result rows and upserts them in bulk, a few times a second.

    The rows hold paid model outputs. A flush the store refuses (a restart, a failover) keeps
    them and tries again with backoff, for as long as a batch's budget, before the error goes
    up; the task's soft time limit cuts that short if it comes first.
    """

    STORE_RETRY_MIN_S, STORE_RETRY_CAP_S = 10.0, 5.0  # the least retry window; the longest wait

    def __init__(self, svc: Services, version: str, *, refresh: bool = False,
                 owner: str | None = None, guard: JobGuard | None = None) -> None:
        self.svc, self.version, self.refresh = svc, version, refresh
        self.owner, self.guard = owner, guard  # the delivery whose lease fences the rows
        self.rows: list[ResultRow] = []
        self.cache: list[dict[str, Any]] = []
        self.last = time.monotonic()
        self._flushing = asyncio.Lock()
        cfg = svc.settings
        self.store_retry_s = max(self.STORE_RETRY_MIN_S,
                                 cfg.task_soft_time_limit_s - cfg.llm_timeout_s - 15)

    async def add(self, row: ResultRow, cache_entry: dict[str, Any] | None = None) -> None:
        self.rows.append(row)
        if cache_entry is not None:
            self.cache.append(cache_entry)
        if self._flushing.locked():
            return  # a flush is waiting for the store: it takes these rows as well
        if len(self.rows) >= FLUSH_ROWS or time.monotonic() - self.last > FLUSH_EVERY_S:
            await self.flush()

    async def flush(self) -> None:
        async with self._flushing:
            failures, written, give_up = 0, 0, time.monotonic() + self.store_retry_s
            while self.rows:
                rows, self.rows, self.last = self.rows, [], time.monotonic()
                entries, self.cache = self.cache, []
                try:
                    dropped = await self.svc.db(
                        functools.partial(self._write, rows=rows, entries=entries))
                except DBAPIError as exc:
                    if not _store_unreachable(exc):
                        raise
                    self.rows[:0], self.cache[:0] = rows, entries  # keep them, in order
                    left = give_up - time.monotonic()
                    if left <= 0:
                        raise
                    wait = min(left, backoff_s(failures, base_s=0.5, cap_s=self.STORE_RETRY_CAP_S,
                                               floor_s=0.2))
                    failures += 1
                    logger.warning("results store unavailable (%s); keeping %d result rows, "
                                   "writing again in %.1fs", type(exc).__name__, len(self.rows),
                                   wait)
                    await asyncio.sleep(wait)
                else:
                    written += len(rows) - len(dropped)
                    if dropped:
                        await self._discarded(dropped)
            if failures:
                logger.warning("results store back: %d result rows written after %d failed "
                               "flushes", written, failures)

    def _write(self, session: Session, rows: list[ResultRow],
               entries: list[dict[str, Any]]) -> list[ResultRow]:
        dropped = leases.record(session, self.version, rows, owner=self.owner)
        # Paid answers go to the response cache even when fenced: the same prompt is the same
        # answer, whichever delivery recorded the chunk.
        cache.store(session, entries, refresh=self.refresh)
        return dropped

    async def _discarded(self, rows: list[ResultRow]) -> None:
        """Rows the fence kept out: their chunks belong to another delivery now. Their calls'
        spend was counted when they ended; the job's totals count recorded results only."""
        tokens = sum(r["tokens_in"] + r["tokens_out"] for r in rows)
        cost = sum(r["cost"] or 0.0 for r in rows)
        if self.guard is not None:
            await self.guard.refund(tokens, cost)
        logger.warning("delivery %s: %d results not recorded (%d tokens): another delivery took "
                       "their chunks over while this one's heartbeat was gone", self.owner,
                       len(rows), tokens)


async def run_batch(svc: Services, batch_id: int, owner: str, budget_s: float,
                    message: str = "") -> Outcome:
    """Work on a batch until every chunk has a final result, or say when to come back.
    `message`: the reservation tag of the task message (workers/batch/liveness.py)."""
    heartbeat = svc.heartbeat
    if heartbeat is None:
        return await _run_batch(svc, batch_id, owner, budget_s)
    # Alive before the first lease is taken, and dead (its leases free) as soon as it returns.
    await heartbeat.register(owner, batch_id, message)
    try:
        return await _run_batch(svc, batch_id, owner, budget_s)
    finally:
        await heartbeat.unregister(owner)


async def _run_batch(svc: Services, batch_id: int, owner: str, budget_s: float) -> Outcome:
    cfg = svc.settings
    heartbeat = svc.heartbeat
    # Whose leases are free besides unheld ones: owners seen dead, and expired leases only while
    # liveness cannot be read (without a heartbeat at all, expiry is all there is).
    dead: set[str] = set()
    expiry_counts = heartbeat is None

    def claim_now(session: Session, info: BatchInfo) -> leases.Claim:
        return _claim_or_finish(session, info, owner, cfg.lease_s, dead, expiry_counts)

    def begin(session: Session) -> tuple[BatchInfo | None, leases.Claim | None]:
        # Count the delivery and take the first claim in one transaction (a round trip less
        # per batch); a batch that will not be worked is not claimed.
        info = leases.start_delivery(session, batch_id)
        if info is None or _not_to_work(cfg, info) is not None:
            return info, None
        return info, claim_now(session, info)

    async with svc.starting:
        info, claim = await svc.db(begin)
    if info is None:
        return Outcome("missing", reason=f"batch {batch_id} is not in the store")
    if stop := _not_to_work(cfg, info):
        reason, status, message = stop
        await svc.db(lambda s: _close(s, info, status, message))
        if reason == "poison":
            logger.error("%s", message)
        return Outcome("done", reason=reason)
    deadline = time.monotonic() + budget_s
    pipeline = svc.pipeline(info)
    guard = JobGuard(svc.redis, info.job_id, info.budget_tokens, info.budget_cost)
    if guard.has_budget:
        spent = await svc.db(lambda s: leases.job_spend(s, info.job_id))
        await guard.prime(*spent)
    while True:
        if claim is None:
            claim = await svc.db(lambda s: claim_now(s, info))
        if claim.unfinished == 0:
            return Outcome("done")  # the same transaction closed the batch
        if heartbeat is not None and heartbeat.lapsed(owner):
            await svc.db(lambda s: leases.end_delivery(s, info, owner, done=False))
            return Outcome("retry", LAPSED_RETRY_S, "this delivery's heartbeat lapsed")
        if heartbeat is not None and claim.holders - dead:
            # Other deliveries hold some chunks: those whose heartbeat is gone lose them now.
            gone = await heartbeat.dead(claim.holders - dead)
            if gone is None and not expiry_counts:
                expiry_counts = True  # Redis lost the record lately: expiry decides meanwhile
                claim = None
                continue
            if gone is not None:
                expiry_counts = False
                if gone:
                    logger.warning("batch %s: taking over the chunks of %d deliveries whose "
                                   "heartbeat is gone", batch_id, len(gone))
                    dead.update(gone)
                    claim = None
                    continue
        outcome = await _work(svc, info, pipeline, guard, claim, owner, deadline)
        if outcome is not None:
            await svc.db(lambda s: leases.end_delivery(s, info, owner, done=False))
            return outcome
        claim = None


def _not_to_work(cfg: Settings, info: BatchInfo) -> tuple[str, str, str] | None:
    """Why this delivery closes the batch without calling the model (reason, status, message)."""
    if info.deliveries > cfg.max_deliveries:
        return "poison", ResultStatus.ERROR, (
            f"batch {info.batch_id} was delivered {info.deliveries - 1} times without finishing "
            f"(worker crashes?); its unfinished chunks are recorded as failed"
        )
    if info.job_status == JobStatus.CANCELLED:
        return "cancelled", ResultStatus.CANCELLED, CANCELLED_MESSAGE
    return None


def _claim_or_finish(session: Session, info: BatchInfo, owner: str, lease_s: float,
                     dead: set[str], expiry_counts: bool) -> leases.Claim:
    """Claim the batch's unfinished chunks; with none left, close the batch in this transaction."""
    claim = leases.claim(session, info, owner, lease_s, dead=dead, expiry_counts=expiry_counts)
    if claim.unfinished == 0:
        leases.end_delivery(session, info, owner, done=True)
    return claim


def _close(session: Session, info: BatchInfo, status: str, message: str) -> None:
    leases.finalize_unfinished(session, info, status, message)
    leases.end_delivery(session, info, "", done=True)


async def _work(
    svc: Services,
    info: BatchInfo,
    pipeline: Pipeline,
    guard: JobGuard,
    claim: leases.Claim,
    owner: str,
    deadline: float,
) -> Outcome | None:
    """One pass over the claimed chunks; None means "claim again", else how this delivery ends."""
    t = leases.now()
    ready = [w for w in claim.items if w.not_before is None or w.not_before <= t]
    waiting = [w for w in claim.items if w not in ready]
    if not claim.items:
        # Another live delivery holds the rest: wait for it rather than report done too early.
        if time.monotonic() + HELD_POLL_S > deadline:
            return Outcome("retry", svc.settings.lease_s, "chunks held by another delivery")
        await asyncio.sleep(HELD_POLL_S)
        return None
    if not ready:
        due = min(w.not_before for w in waiting if w.not_before is not None)
        wait = max(0.0, (due - t).total_seconds())
        if wait > INLINE_WAIT_S or time.monotonic() + wait > deadline:
            await svc.db(lambda s: leases.release(s, [w.chunk_id for w in waiting], owner))
            return Outcome("retry", wait, "waiting for retry backoff")
        await asyncio.sleep(wait)
        return None

    writer = _Writer(svc, info.pipeline_version, refresh=info.cache_policy == CachePolicy.REFRESH,
                     owner=owner, guard=guard)
    metrics.current_pipeline.set(info.pipeline)  # the label of this pass's calls
    busy: list[_Pause] = []

    def lapsed() -> bool:
        return svc.heartbeat is not None and svc.heartbeat.lapsed(owner)

    calls = [_prepare(svc, info, pipeline, w) for w in ready]
    if info.cache_policy == CachePolicy.USE:
        hits = await svc.db(lambda s: cache.lookup(s, [c.key for c in calls]))
        for c in [c for c in calls if c.key in hits]:
            await writer.add(_cached_row(info, c, *hits[c.key]))
        misses = [c for c in calls if c.key not in hits]
        metrics.cache_hits(svc.settings.model_name, info.pipeline, len(calls) - len(misses))
        calls = misses

    async def one(call: _Call) -> None:
        if busy or time.monotonic() > deadline or lapsed():
            return
        row = await _call(svc, info, pipeline, guard, call, busy, lapsed, deadline)
        if row is None:
            return
        cache_entry = None
        if row["status"] == ResultStatus.OK and info.cache_policy != CachePolicy.OFF:
            cache_entry = {"key": call.key, "output": row["output"], "model": svc.settings.model_name,
                           "finish_reason": row["finish_reason"], "tokens_in": row["tokens_in"],
                           "tokens_out": row["tokens_out"]}
        await writer.add(row, cache_entry)

    await asyncio.gather(*(one(c) for c in calls))
    await writer.flush()
    if busy or time.monotonic() > deadline or lapsed():
        # Hand the slot back: the chunks not done yet go to the next delivery.
        await svc.db(lambda s: leases.release(s, [w.chunk_id for w in claim.items], owner))
        if lapsed():
            return Outcome("retry", LAPSED_RETRY_S, "this delivery's heartbeat lapsed")
        if busy:
            longest = max(busy, key=lambda p: p.wait_s)
            return Outcome("retry", longest.wait_s, longest.reason)
        return Outcome("retry", 0.0, "batch time budget used")
    return None


@dataclass(frozen=True, slots=True)
class _Pause:
    """Why a pass stops starting calls, and how long the batch should wait before the next."""

    wait_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class _Call:
    item: WorkItem
    prompt: Prompt
    max_tokens: int
    key: str


def _prepare(svc: Services, info: BatchInfo, pipeline: Pipeline, item: WorkItem) -> _Call:
    cfg = svc.settings
    prompt = pipeline.render(item.text, cfg.mode, item.level)
    max_tokens = min(prompt.max_tokens or cfg.llm_max_tokens, cfg.llm_max_tokens)
    key = cache.cache_key(svc.endpoint, cfg.model_name, info.pipeline_version, prompt, max_tokens,
                          cfg.llm_temperature)
    return _Call(item, prompt, max_tokens, key)


def _base_row(info: BatchInfo, item: WorkItem, attempts: int) -> ResultRow:
    return leases.blank_result(item.chunk_id, info.job_id, item.document_id, attempts)


def _cached_row(info: BatchInfo, call: _Call, output: Any, finish: str | None) -> ResultRow:
    row = _base_row(info, call.item, call.item.attempts)
    row.update({
        "status": ResultStatus.OK,
        "output": output,
        "finish_reason": finish,
        "cost": 0.0,
        "cached": True,
    })
    return row


def _stopped_row(info: BatchInfo, item: WorkItem, reason: StopReason) -> ResultRow:
    row = _base_row(info, item, item.attempts)
    if reason == StopReason.BUDGET:
        row.update({
            "status": ResultStatus.SKIPPED_BUDGET,
            "error_message": "the job's budget was spent before this chunk's call",
        })
    else:
        row.update({"status": ResultStatus.CANCELLED, "error_message": CANCELLED_MESSAGE})
    return row


async def _call(
    svc: Services, info: BatchInfo, pipeline: Pipeline, guard: JobGuard, call: _Call,
    busy: list[_Pause], lapsed: Callable[[], bool], deadline: float,
) -> ResultRow | None:
    """Call the model for one chunk; return its result row, or None if it was not attempted."""
    row = _base_row(info, call.item, call.item.attempts + 1)
    async with svc.inflight:
        # The budget is checked with the slot in hand, right before the call, and the call's
        # spend is counted before the slot is handed on: every call that starts sees the spend
        # of every call that has ended, so a budget overshoots by at most the calls in flight.
        if reason := await guard.stop_reason():
            return _stopped_row(info, call.item, reason)
        if busy or lapsed():  # the pass stopped while this call waited for its slot
            return None

        async def interrupted() -> bool:  # while the call waited for the limiter
            return bool(busy) or lapsed() or await guard.stop_reason() is not None

        try:
            completion = await _limited_call(svc, info, call.prompt, call.max_tokens,
                                             slot_wait_s=deadline - time.monotonic(),
                                             interrupted=interrupted)
        except _Interrupted:
            if reason := await guard.stop_reason():
                return _stopped_row(info, call.item, reason)
            return None
        except LimiterBusy as exc:
            busy.append(_Pause(exc.wait_s, "waiting for rate-limit capacity"))
            return None
        except EndpointUnreachableError as exc:
            # Not an attempt: nothing was sent. The batch hands its chunks back and waits.
            wait = svc.endpoint_down.refused()
            if not busy:
                logger.warning("batch %s: %s; trying again in %.1fs", info.batch_id, exc, wait)
            busy.append(_Pause(wait, str(exc)))
            return None
        except PermanentError as exc:
            return _failed(row, exc, final=True)
        except RetryableError as exc:
            return _retry_or_fail(svc.settings, row, exc)
        svc.endpoint_down.reached()
        row.update({
            "finish_reason": completion.finish_reason,
            "tokens_in": completion.tokens_in,
            "tokens_out": completion.tokens_out,
            "latency_ms": round(completion.latency_ms, 2),
            "cost": cost_of(svc.settings, completion, info.service_tier),
        })
        await guard.spend(row["tokens_in"] + row["tokens_out"], row["cost"])
    try:
        row["output"] = pipeline.parse(completion.text, completion.finish_reason)
    except PermanentError as exc:
        return _failed(row, exc, final=True)
    except RetryableError as exc:  # output that does not parse: a new sample may
        return _retry_or_fail(svc.settings, row, exc)
    row["status"] = ResultStatus.OK
    return row


class _Interrupted(Exception):
    """The pass stopped (a cancel, a budget, a pause) while a call waited for the limiter."""


async def _limited_call(svc: Services, info: BatchInfo, prompt: Prompt, max_tokens: int,
                        slot_wait_s: float,
                        interrupted: Callable[[], Awaitable[bool]]) -> Completion:
    lim = svc.limiter
    if lim is None:
        return await svc.llm.complete(prompt, max_tokens=max_tokens,
                                          service_tier=info.service_tier)
    key = f"{info.pipeline}:{info.pipeline_version}"
    by_max_tokens = svc.settings.llm_tpm_charge == "max_tokens"
    # A provider that charges max_tokens at admission must be reserved for the same; one that
    # charges usage gets the moving average of real outputs (plus a margin), settled later.
    expected = max_tokens if by_max_tokens else await lim.expected_output_tokens(
        key, cap=max_tokens, default=max_tokens // 2)
    # A call waiting for an in-flight slot waits while its pass may run: a slot frees with
    # the next answer; a long wait for rate-limit budget hands the batch back instead.
    ticket = await lim.acquire(prompt_tokens(prompt) + expected,
                               max_wait_s=svc.settings.limiter_max_wait_s,
                               slot_wait_s=slot_wait_s)
    if await interrupted():
        await lim.release(ticket, refund=True)  # nothing was sent
        raise _Interrupted
    try:
        completion = await svc.llm.complete(prompt, max_tokens=max_tokens,
                                          service_tier=info.service_tier)
    except RateLimitedError as exc:
        # The provider consumed nothing; every process pauses for its Retry-After.
        await lim.release(ticket, refund=True, overloaded=True)
        await lim.cool_down(exc.retry_after_s if exc.retry_after_s is not None else 1.0)
        raise
    except EndpointUnreachableError:
        await lim.release(ticket, refund=True)  # the request never left
        raise
    except RetryableError:  # 5xx, a timeout, a cut connection: the server is struggling
        await lim.release(ticket, refund=False, overloaded=True)
        raise
    except BaseException:
        await lim.release(ticket, refund=False)
        raise
    charged = completion.tokens_in + (max_tokens if by_max_tokens else completion.tokens_out)
    await lim.settle(ticket, charged, headers=completion.headers, output_key=key,
                     output_tokens=completion.tokens_out, latency_s=completion.latency_ms / 1000)
    return completion


def prompt_tokens(prompt: Prompt) -> int:
    if prompt.text is not None:
        return count_tokens(prompt.text)
    # Chat: the contents plus a few tokens of framing per message.
    return sum(count_tokens(m["content"]) + 4 for m in prompt.messages or []) + 3


def cost_of(settings: Settings, c: Completion, tier: str | None = None) -> float | None:
    price = settings.price_for(settings.model_name)
    if price is None:
        return None  # an unknown model's cost is unknown, not zero
    return price.cost(c.tokens_in, c.tokens_out, tier=tier)


def _failed(row: ResultRow, exc: Exception, *, final: bool) -> ResultRow:
    row.update({
        "status": ResultStatus.ERROR if final else ResultStatus.RETRY,
        "error_type": type(exc).__name__,
        "error_message": str(exc),
        "http_status": getattr(exc, "http_status", None),
    })
    return row


def _retry_or_fail(settings: Settings, row: ResultRow, exc: RetryableError) -> ResultRow:
    attempts = row["attempts"]
    # An answer that does not parse usually comes back the same (temperature 0): one more try.
    cap = min(settings.max_attempts, MAX_PARSE_ATTEMPTS) if isinstance(
        exc, OutputParseError) else settings.max_attempts
    if attempts >= cap:
        _failed(row, exc, final=True)
        row["error_message"] = f"gave up after {attempts} attempts; last error: {exc}"
        return row
    floor = getattr(exc, "retry_after_s", None)
    wait = backoff_s(
        attempts,
        base_s=settings.retry_backoff_base_s,
        cap_s=settings.retry_backoff_max_s,
        floor_s=floor,
    )
    _failed(row, exc, final=False)
    row["not_before"] = leases.now() + timedelta(seconds=wait)
    return row
