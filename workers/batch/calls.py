"""One chunk's model call: the budget check, the limiter, the call, and its result row.

Guarantees: the budget is checked with the in-flight slot in hand and a call's spend is counted
before the slot is handed on, so a budget overshoots by at most the calls in flight; a call
reserves what the provider will charge and settles with its usage (a 429 refunds and cools every
process down, a refused connection is no attempt); a permanent error is final at once, a
retryable one is tried again with backoff (honouring Retry-After) until DOCQ_MAX_ATTEMPTS, and
output that does not parse at most `MAX_PARSE_ATTEMPTS` times. A refused API key (401, 403)
stops the whole job: its chunks not yet sent fail with the same reason, without a call
(batch/guard.py). Failures of a shared cause are told to the process's trouble log
(batch/trouble.py), which the status views read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from docqueue.models import ResultStatus
from docqueue.workers.batch import cache, leases
from docqueue.workers.batch.guard import JobGuard, Refusal, StopReason
from docqueue.workers.batch.leases import BatchInfo, ResultRow, WorkItem
from docqueue.workers.batch.services import Services
from docqueue.workers.batch.trouble import Trouble
from docqueue.workers.clock import monotonic_s
from docqueue.workers.errors import (
    AuthenticationRefusedError,
    EndpointUnreachableError,
    PermanentError,
    RateLimitedError,
    RetryableError,
)
from docqueue.workers.pipelines import OutputParseError, Pipeline, Prompt
from docqueue.workers.provider import prompt_cache
from docqueue.workers.provider.admission import LimiterBusy
from docqueue.workers.provider.retry import backoff_s
from docqueue.workers.settings import Settings
from docqueue.workers.tokens import count_tokens

if TYPE_CHECKING:  # the model client imports langchain-openai: a producer never needs it
    from docqueue.workers.provider.client import Completion

logger = logging.getLogger(__name__)

CANCELLED_MESSAGE = "the job was cancelled before this chunk's call"
MAX_PARSE_ATTEMPTS = 2  # output that does not parse comes back the same at temperature 0


@dataclass(frozen=True, slots=True)
class Pause:
    """Why a pass stops starting calls, and how long the batch should wait before the next."""

    wait_s: float
    reason: str
    trouble: Trouble | None = None  # the shared cause behind it, once it makes a case


@dataclass(frozen=True, slots=True)
class Call:
    item: WorkItem
    prompt: Prompt
    max_tokens: int
    key: str


def prepare(svc: Services, info: BatchInfo, pipeline: Pipeline, item: WorkItem) -> Call:
    cfg = svc.settings
    prompt = pipeline.render(item.text, cfg.mode, item.level)
    max_tokens = min(prompt.max_tokens or cfg.llm_max_tokens, cfg.llm_max_tokens)
    key = cache.cache_key(svc.endpoint, cfg.model_name, info.pipeline_version, prompt, max_tokens,
                          cfg.llm_temperature)
    return Call(item, prompt, max_tokens, key)


def _base_row(info: BatchInfo, item: WorkItem, attempts: int) -> ResultRow:
    return leases.blank_result(item.chunk_id, info.job_id, item.document_id, attempts)


def cached_row(info: BatchInfo, call: Call, output: Any, finish: str | None) -> ResultRow:
    row = _base_row(info, call.item, call.item.attempts)
    row.update({
        "status": ResultStatus.OK,
        "output": output,
        "finish_reason": finish,
        "cost": 0.0,
        "cached": True,
    })
    return row


def _stopped_row(info: BatchInfo, item: WorkItem, guard: JobGuard,
                 reason: StopReason) -> ResultRow:
    row = _base_row(info, item, item.attempts)
    if reason == StopReason.BUDGET:
        row.update({
            "status": ResultStatus.SKIPPED_BUDGET,
            "error_message": "the job's budget was spent before this chunk's call",
        })
    elif reason == StopReason.REFUSED:
        # The refusal's own words, type and status: the chunks it kept from a call fail for
        # the one reason (Flower's story lists them together).
        refusal = guard.refusal or Refusal.loads(None)
        row.update({"status": ResultStatus.ERROR, "error_type": refusal.error_type,
                    "error_message": refusal.message, "http_status": refusal.http_status})
    else:
        row.update({"status": ResultStatus.CANCELLED, "error_message": CANCELLED_MESSAGE})
    return row


async def call_model(
    svc: Services, info: BatchInfo, pipeline: Pipeline, guard: JobGuard, call: Call,
    busy: list[Pause], lapsed: Callable[[], bool], deadline: float,
) -> ResultRow | None:
    """Call the model for one chunk; return its result row, or None if it was not attempted."""
    row = _base_row(info, call.item, call.item.attempts + 1)
    async with svc.inflight:
        # The budget is checked with the slot in hand, right before the call, and the call's
        # spend is counted before the slot is handed on: every call that starts sees the spend
        # of every call that has ended, so a budget overshoots by at most the calls in flight.
        if reason := await guard.stop_reason():
            return _stopped_row(info, call.item, guard, reason)
        if busy or lapsed():  # the pass stopped while this call waited for its slot
            return None

        async def interrupted() -> bool:  # while the call waited for the limiter
            return bool(busy) or lapsed() or await guard.stop_reason() is not None

        try:
            completion = await _limited_call(svc, info, call.prompt, call.max_tokens,
                                             slot_wait_s=deadline - monotonic_s(),
                                             interrupted=interrupted)
        except _Interrupted:
            if reason := await guard.stop_reason():
                return _stopped_row(info, call.item, guard, reason)
            return None
        except LimiterBusy as exc:
            busy.append(Pause(exc.wait_s, "waiting for rate-limit capacity"))
            return None
        except EndpointUnreachableError as exc:
            # Not an attempt: nothing was sent. The batch hands its chunks back and waits.
            wait = svc.endpoint_down.refused()
            if not busy:
                logger.warning("batch %s: %s; trying again in %.1fs", info.batch_id, exc, wait)
            busy.append(Pause(wait, str(exc), await _trouble(svc, info, exc, wait)))
            return None
        except AuthenticationRefusedError as exc:
            # Every call of the job with this key would be refused: stop them all, here first
            # (with the slot still in hand, so no call of this process starts after it).
            await guard.refuse(exc)
            await _trouble(svc, info, exc, None)
            return _failed(row, exc, final=True)
        except PermanentError as exc:
            return _failed(row, exc, final=True)
        except RetryableError as exc:
            row, backoff = _retry_or_fail(svc.settings, row, exc)
            await _trouble(svc, info, exc, backoff)
            return row
        svc.endpoint_down.reached()
        if svc.troubles is not None:
            await svc.troubles.ok(info.job_id, seen=guard.take_trouble_seen())
        row.update({
            "finish_reason": completion.finish_reason,
            "tokens_in": completion.tokens_in,
            "tokens_in_cached": completion.tokens_in_cached,
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
        return _retry_or_fail(svc.settings, row, exc)[0]
    row["status"] = ResultStatus.OK
    return row


async def _trouble(svc: Services, info: BatchInfo, exc: BaseException,
                   wait_s: float | None) -> Trouble | None:
    """Tell the process's trouble log of a failed call; the job's trouble, if it has one."""
    if svc.troubles is None:
        return None
    return await svc.troubles.failed(info.job_id, exc, wait_s)


class _Interrupted(Exception):
    """The pass stopped (a cancel, a budget, a pause) while a call waited for the limiter."""


async def _limited_call(svc: Services, info: BatchInfo, prompt: Prompt, max_tokens: int,
                        slot_wait_s: float,
                        interrupted: Callable[[], Awaitable[bool]]) -> Completion:
    lim = svc.limiter
    cache_key = (prompt_cache.cache_key(info.job_id, info.pipeline)
                 if svc.settings.sends_prompt_cache_key else None)
    if lim is None:
        return await svc.llm.complete(prompt, max_tokens=max_tokens,
                                      service_tier=info.service_tier, cache_key=cache_key)
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
                                            service_tier=info.service_tier, cache_key=cache_key)
    except RateLimitedError as exc:
        # The provider consumed nothing; every process pauses for its Retry-After. Its budget
        # headers teach the limiter the provider's real limit now: learned only from the next
        # success, the pause would end with the bucket refilling at the configured (too high)
        # rate, and the calls sent as it ends would be refused again.
        await lim.release(ticket, refund=True, overloaded=True, headers=exc.rate_headers)
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
    return price.cost(c.tokens_in, c.tokens_out, tier=tier, cached=c.tokens_in_cached)


def _failed(row: ResultRow, exc: Exception, *, final: bool) -> ResultRow:
    row.update({
        "status": ResultStatus.ERROR if final else ResultStatus.RETRY,
        "error_type": type(exc).__name__,
        "error_message": str(exc),
        "http_status": getattr(exc, "http_status", None),
    })
    return row


def _retry_or_fail(settings: Settings, row: ResultRow,
                   exc: RetryableError) -> tuple[ResultRow, float | None]:
    """The row of a failed attempt, final once the attempts are spent, and the wait before
    the chunk's next (None: there is none)."""
    attempts = row["attempts"]
    # An answer that does not parse usually comes back the same (temperature 0): one more try.
    cap = min(settings.max_attempts, MAX_PARSE_ATTEMPTS) if isinstance(
        exc, OutputParseError) else settings.max_attempts
    if attempts >= cap:
        _failed(row, exc, final=True)
        row["error_message"] = f"gave up after {attempts} attempts; last error: {exc}"
        return row, None
    floor = getattr(exc, "retry_after_s", None)
    wait = backoff_s(
        attempts,
        base_s=settings.retry_backoff_base_s,
        cap_s=settings.retry_backoff_max_s,
        floor_s=floor,
    )
    _failed(row, exc, final=False)
    row["not_before"] = leases.now() + timedelta(seconds=wait)
    return row, wait
