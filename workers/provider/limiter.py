"""The global rate limiter: one RPM + TPM budget and one in-flight cap shared by every process.

Each (endpoint, model, key) scope is a pair of continuously refilling buckets held in Redis,
each of capacity = one period's limit, starting full and refilling at limit/period, which is
how the provider meters us. Every step is one Lua script (see `workers/provider/lua/`) run
against Redis's clock, so all machines agree on time and no two callers can take the same
capacity.

Guarantee, per dimension (L = the limit, P = period_s, Redis time): a call is admitted only if
its whole reservation fits in the bucket at that instant, so for every interval [a, b]

    reserved by calls admitted in [a, b]  <=  L + L * (b - a) / P  +  refunds settled in [a, b].

With no refunds, no window of length P admits more than 2 L, and a window of length w no more
than L + L w / P: the envelope of the provider's own bucket. A refund only returns the part of a
call's charge that has not refilled yet (charges refill oldest first), so when every call uses
at most what it reserved, what the calls really use also stays inside L + L (b - a) / P: a
provider metering with the same bucket never has cause to answer 429. Overruns are charged at
settle time and paid back before anyone else is admitted.

Waiting happens in the caller, in short sleeps; nothing is held while waiting. Within a process
one waiter at a time polls Redis (the others queue behind it, first come first served); across
processes the first process to be refused holds a claim on what its waiter needs, and the others
may only use what is left beyond it, so a large request is not starved by a stream of small ones.

Build one Limiter per process and scope, after the fork, on that process's event loop. The
limits, the ticket and the refusals it speaks in are in workers/provider/admission.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from docqueue.workers.clock import monotonic_s
from docqueue.workers.provider import scripts
from docqueue.workers.provider.admission import (
    LimiterBusy,
    Limits,
    RequestTooLargeError,
    Ticket,
    as_text,
    as_us,
    check_count,
    check_key,
    is_positive,
    output_pair,
    parsed_headers,
)
from docqueue.workers.provider.headers import RateLimitHeaders

ANSWERED, OVERLOADED = 1, 2  # how a call ended, for adaptive concurrency
logger = logging.getLogger(__name__)

POLL_CAP_S = 0.25  # longest sleep between two looks at the shared state
CLAIM_GRACE_S = 0.25  # how long a waiter's claim outlives its next expected look
SLOT_POLL_FIRST_S = 0.005  # first pause when every in-flight slot is taken; doubles per look
OUTPUT_WEIGHT = 2 / 51  # moving average of output sizes over about the last 50 calls
OUTPUT_MARGIN_SD = 2.0  # reserve mean + 2 sd of the output: few calls overrun, refunds cost little
OUTPUT_CACHE_S = 5.0  # how long a process reuses the shared average before reading it again


class Limiter:
    """Shared RPM/TPM buckets and in-flight slots for one scope, over an asyncio Redis client."""

    def __init__(self, redis: Redis, scope: str, limits: Limits, *, slot_ttl_s: float) -> None:
        if not scope or any(ch in scope for ch in "{} \t\r\n"):
            raise ValueError(f"limiter scope must be non-empty without braces or spaces: {scope!r}")
        if not is_positive(slot_ttl_s):
            raise ValueError(f"slot_ttl_s must be a finite number > 0, got {slot_ttl_s!r}")
        self.scope = scope
        self.limits = limits
        self._redis = redis
        self._keys = [f"{{{scope}}}:state", f"{{{scope}}}:slots", f"{{{scope}}}:out",
                      f"{{{scope}}}:admissions"]
        self._common = [limits.rpm or 0, limits.tpm or 0, as_us(limits.period_s)]
        mode = 2 if limits.adaptive is None else int(limits.adaptive)
        self._adaptive = [mode, limits.window_floor, limits.window_start, limits.max_inflight]
        self._slot_ttl_us = as_us(slot_ttl_s)
        self._acquire_lua = redis.register_script(scripts.ACQUIRE)
        self._finish_lua = redis.register_script(scripts.FINISH)
        self._cool_down_lua = redis.register_script(scripts.COOL_DOWN)
        self._snapshot_lua = redis.register_script(scripts.SNAPSHOT)
        self._keep_alive_lua = redis.register_script(scripts.KEEP_ALIVE)
        # The slots this process holds, kept alive while it runs: a process that dies or freezes
        # stops refreshing them, and they stop counting against the cap a slot TTL later.
        self._held: set[str] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._gate = asyncio.Lock()  # one waiter per process polls Redis; the rest queue here
        self._free_at = 0.0  # loop time when the last reply expected room for a call again
        self._claimant = os.urandom(8).hex()  # this process's name on a claim
        self._outputs: dict[str, tuple[float, float] | None] = {}  # key: (mean, variance)
        self._outputs_read_at: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"Limiter(scope={self.scope!r}, limits={self.limits!r})"

    async def load_scripts(self) -> None:
        """Load the Lua scripts into Redis now: a first use by many calls at once would have
        each of them find the script missing and load it."""
        for script in (self._acquire_lua, self._finish_lua, self._cool_down_lua,
                       self._snapshot_lua, self._keep_alive_lua):
            await self._redis.script_load(script.script)

    async def acquire(
        self, tokens: int, *, max_wait_s: float, slot_wait_s: float | None = None
    ) -> Ticket:
        """Reserve one request, `tokens` tokens and an in-flight slot, waiting up to max_wait_s.

        `slot_wait_s` (at least max_wait_s) lets the caller wait longer when every in-flight
        slot is taken: a slot frees as soon as any call ends, so waiting for one in the process
        costs nothing, where handing the work back costs a round trip through the queue. A
        wait for the request or token budget longer than max_wait_s still raises at once.

        Raises:
            LimiterBusy: the wait would be longer than allowed (nothing is held).
            RequestTooLargeError: `tokens` exceeds the whole token budget.
        """
        check_count("tokens", tokens)
        if not (math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ValueError(f"max_wait_s must be a finite number >= 0, got {max_wait_s!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(max_wait_s, slot_wait_s or 0.0)
        slot_id = os.urandom(8).hex()
        if not self._gate.locked():  # nobody of this process is waiting: try at once
            first = await self._attempt(tokens, slot_id, max_wait_s)
            if isinstance(first, Ticket):
                return first
        try:
            async with asyncio.timeout(deadline - loop.time()):
                await self._gate.acquire()
        except TimeoutError:
            raise LimiterBusy(max(self._free_at - loop.time(), 0.0), "queue") from None
        try:
            return await self._wait_turn(tokens, slot_id, deadline, max_wait_s)
        finally:
            self._gate.release()

    async def _wait_turn(
        self, tokens: int, slot_id: str, deadline: float, max_wait_s: float
    ) -> Ticket:
        loop = asyncio.get_running_loop()
        slot_pause = SLOT_POLL_FIRST_S
        delay = self._free_at - loop.time()
        while True:
            pause = min(delay, POLL_CAP_S, deadline - loop.time())
            if pause > 0:
                await asyncio.sleep(pause)
            left = deadline - loop.time()
            outcome = await self._attempt(tokens, slot_id, max(0.0, min(left, max_wait_s)))
            if isinstance(outcome, Ticket):
                return outcome
            status, seconds = outcome
            if status == "wait":
                delay = seconds
                continue
            # Every slot is taken: any call may finish at any moment, so look again soon.
            if left <= 0:
                raise LimiterBusy(min(seconds, POLL_CAP_S), "in-flight")
            delay = min(slot_pause, left, seconds) * random.uniform(0.5, 1.0)
            slot_pause = min(2 * slot_pause, POLL_CAP_S)

    async def _attempt(
        self, tokens: int, slot_id: str, left_s: float
    ) -> Ticket | tuple[str, float]:
        reply = await self._acquire_lua(
            keys=self._keys,
            args=[
                *self._common, tokens, self.limits.max_inflight, self._slot_ttl_us, slot_id,
                as_us(left_s), as_us(POLL_CAP_S), as_us(CLAIM_GRACE_S), self._claimant,
                *self._adaptive[:3],
            ],
        )
        status = as_text(reply[0])
        loop_now = asyncio.get_running_loop().time()
        if status == "ok":
            now_us, k_r, k_t, a_r, a_t, next_us = (float(as_text(x)) for x in reply[1:7])
            self._free_at = loop_now + next_us / 1e6
            self._hold(slot_id)
            return Ticket(slot_id, tokens, int(now_us), k_r, k_t, a_r, a_t)
        value = float(as_text(reply[1]))
        if status == "big":
            raise RequestTooLargeError(tokens, int(value))
        seconds = value / 1e6
        if status == "busy":
            raise LimiterBusy(seconds, as_text(reply[2]))
        if status == "wait":
            self._free_at = loop_now + seconds
        return status, seconds

    async def settle(
        self,
        ticket: Ticket,
        used_tokens: int,
        *,
        headers: Mapping[str, str] | None = None,
        output_key: str | None = None,
        output_tokens: int | None = None,
        latency_s: float | None = None,
    ) -> None:
        """The call succeeded: charge what it used instead of what it reserved (refunding the
        rest unless Limits.refund_unused_tokens is False), and free the slot.

        Pass the response `headers` to do `observe` in the same round trip, `output_key` with
        `output_tokens` to do `record_output_tokens` in it too, and the call's `latency_s` for
        adaptive concurrency.
        """
        check_count("used_tokens", used_tokens)
        output = output_pair(output_key, output_tokens)
        charged = used_tokens
        if not self.limits.refund_unused_tokens:
            charged = max(used_tokens, ticket.tokens)
        ended = None
        if latency_s is not None:  # with the output's size, when known: answers then compare
            ended = (ANSWERED, latency_s, -1 if output_tokens is None else output_tokens)
        await self._finish(ticket, charged, False, parsed_headers(headers), output, ended=ended)

    async def release(
        self, ticket: Ticket, *, refund: bool, headers: Mapping[str, str] | None = None,
        overloaded: bool = False,
    ) -> None:
        """The call failed: free the slot; with refund=True (the provider consumed nothing, e.g.
        a 429 or a refused connection) also give back its request and tokens. `overloaded`
        (a 429, 5xx or timeout) shrinks the adaptive concurrency window."""
        charged = 0 if refund else ticket.tokens
        ended = (OVERLOADED, 0.0, -1) if overloaded else None
        await self._finish(ticket, charged, refund, parsed_headers(headers), None, ended=ended)

    async def observe(self, headers: Mapping[str, str], *, ticket: Ticket | None = None) -> None:
        """Learn the limits from x-ratelimit-* headers and lower the shared buckets to what the
        provider reports remaining. Pass the ticket of the call that got these headers: the
        calls admitted after it are then counted as not yet seen by the provider."""
        parsed = parsed_headers(headers)
        if parsed is not None:
            await self._finish(None, 0, False, parsed, None, since=ticket)

    async def record_output_tokens(self, key: str, tokens: int) -> None:
        """Add one real output size to the shared moving average of pipeline `key`."""
        await self._finish(None, 0, False, None, output_pair(key, tokens))

    async def expected_output_tokens(self, key: str, *, cap: int, default: int) -> int:
        """What to reserve for the output of a call of pipeline `key`: the moving mean of real
        outputs plus OUTPUT_MARGIN_SD standard deviations, at most `cap` (max_tokens); `default`
        (also capped) until a size has been recorded."""
        check_key(key)
        check_count("cap", cap, minimum=1)
        check_count("default", default)
        now = monotonic_s()
        if now - self._outputs_read_at.get(key, -math.inf) > OUTPUT_CACHE_S:
            mean, variance = await self._redis.hmget(self._keys[2], [f"{key}|m", f"{key}|v"])
            stats = None if mean is None else (float(mean), float(variance or 0))
            self._remember_output(key, stats)
        stats = self._outputs[key]
        if stats is None:
            return min(default, cap)
        estimate = math.ceil(stats[0] + OUTPUT_MARGIN_SD * math.sqrt(max(stats[1], 0.0)))
        return max(0, min(cap, estimate))

    async def cool_down(self, seconds: float) -> float:
        """After a 429: no process is admitted for `seconds` (an existing longer cool-down is
        kept), and the buckets are emptied as the provider's is. Returns the cool-down in force."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"cool-down seconds must be a finite number >= 0, got {seconds!r}")
        left = await self._cool_down_lua(keys=self._keys[:2], args=[*self._common, as_us(seconds)])
        return float(as_text(left)) / 1e6

    async def snapshot(self) -> dict[str, Any]:
        """The shared state for `docq status`: limits, use over the last period, availability."""
        reply = await self._snapshot_lua(keys=self._keys[:2], args=self._common)
        # In the script's order: limit r, t; learned r, t; available r, t; used r, t; in flight;
        # cool-down µs left.
        values = [float(as_text(x)) for x in reply[:10]]
        window = as_text(reply[10])
        configured = (self.limits.rpm, self.limits.tpm)
        return {
            "scope": self.scope,
            "period_s": self.limits.period_s,
            **{
                name: {
                    "limit": int(values[i]) or None,
                    "configured": configured[i],
                    "learned": int(values[2 + i]) or None,
                    "used": int(values[6 + i]),
                    "available": round(values[4 + i], 3) if values[i] else None,
                }
                for i, name in enumerate(("requests", "tokens"))
            },
            "inflight": int(values[8]),
            "max_inflight": self.limits.max_inflight,
            "window": (None if self.limits.adaptive is False
                       else int(float(window)) if window else self.limits.window_start),
            "cool_down_s": round(values[9] / 1e6, 3),
        }

    async def _finish(
        self,
        ticket: Ticket | None,
        charged: int,
        refund_request: bool,
        headers: RateLimitHeaders | None,
        output: tuple[str, int] | None,
        *,
        since: Ticket | None = None,
        ended: tuple[int, float, int] | None = None,
    ) -> None:
        call = ticket or since
        outcome, latency_s, output_size = ended or (0, 0.0, -1)
        if ticket is not None:
            self._held.discard(ticket.slot_id)
        h = headers or RateLimitHeaders()
        reply = await self._finish_lua(
            keys=self._keys,
            args=[
                *self._common,
                *(
                    (ticket.slot_id, ticket.tokens, charged, int(refund_request),
                     ticket.request_mark, ticket.token_mark)
                    if ticket else ("", 0, 0, 0, 0, 0)
                ),
                *(output or ("", 0)),
                OUTPUT_WEIGHT,
                h.limit_requests or 0,
                h.limit_tokens or 0,
                -1 if h.remaining_requests is None else h.remaining_requests,
                -1 if h.remaining_tokens is None else h.remaining_tokens,
                *(
                    (call.admitted_at_us, call.requests_admitted, call.tokens_admitted)
                    if call else (-1, 0, 0)
                ),
                outcome, as_us(latency_s), *self._adaptive, output_size,
            ],
        )
        if output is not None:
            self._remember_output(output[0], (float(as_text(reply[0])), float(as_text(reply[1]))))

    async def aclose(self) -> None:
        """Stop renewing slots (the process is closing its loop; they expire on their own)."""
        if self._keeper is not None and not self._keeper.done():
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper

    def _hold(self, slot_id: str) -> None:
        self._held.add(slot_id)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_alive(),
                                                                  name="limiter-slots")

    async def _keep_alive(self) -> None:
        every_s = self._slot_ttl_us / 1e6 / 3
        while self._held:
            await asyncio.sleep(every_s)
            held = list(self._held)
            if not held:
                break
            try:
                await self._keep_alive_lua(keys=self._keys[1:2], args=[self._slot_ttl_us, *held])
            except Exception as exc:
                logger.warning("limiter: cannot renew %d in-flight slots (%s); they expire in "
                               "%gs unless renewed", len(held), type(exc).__name__,
                               self._slot_ttl_us / 1e6)

    def _remember_output(self, key: str, stats: tuple[float, float] | None) -> None:
        self._outputs[key] = stats
        self._outputs_read_at[key] = monotonic_s()


