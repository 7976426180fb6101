"""The global limiter against a real Redis, from several processes at once.

Times in these tests are Redis's clock (what the limiter itself uses), read from the tickets.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from docqueue.workers.provider.admission import LimiterBusy, Limits, RequestTooLargeError, Ticket
from docqueue.workers.provider.limiter import Limiter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPAWN = multiprocessing.get_context("spawn")
# These tests keep to the keys they make ({t:...}), in the test process's own Redis DB
# (tests/conftest.py: DOCQ_TEST_REDIS_DB, or one DB per xdist worker), flushed by no one else
# during a multi-second run, which would refill the buckets and void its figures.
OWN_KEYS = "{t:*"


@pytest.fixture
def redis_url(redis_url: str) -> Iterator[str]:
    """The shared fixture's DB (skipped or failed when the server is missing), with this
    module's keys deleted before and after."""
    client = redis.Redis.from_url(redis_url)

    def clean() -> None:
        keys = list(client.scan_iter(match=OWN_KEYS, count=1000))
        if keys:
            client.delete(*keys)

    clean()
    yield redis_url
    clean()
    client.close()


def run(redis_url: str, scenario: Callable[[Redis], Awaitable[Any]]) -> Any:
    """Run one asyncio scenario with its own client, closed afterwards."""

    async def main() -> Any:
        client = Redis.from_url(redis_url)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


async def redis_now_s(client: Redis) -> float:
    seconds, micros = await client.time()
    return float(seconds) + micros / 1e6


def worst_excess(events: list[tuple[int, float]], limit: float, period_s: float) -> float:
    """max over all windows [a, b] of: amount admitted in it - (limit + limit (b - a) / period).

    `events` are (Redis µs, amount). O(n): the window sum minus the refill is a difference of
    prefix terms, so the best start for each end is a running minimum.
    """
    rate = limit / (period_s * 1e6)
    worst, prefix, best_start = -float("inf"), 0.0, float("inf")
    for at_us, amount in sorted(events):
        best_start = min(best_start, prefix - rate * at_us)
        prefix += amount
        worst = max(worst, prefix - rate * at_us - best_start - limit)
    return worst


# -- several processes sharing one budget ---------------------------------------------------------


def hammer(
    redis_url: str, barrier: Any, results: Any, seed: int, phases: list[dict[str, Any]]
) -> None:
    """One process: wait for the others, then run each phase with 12 concurrent callers."""
    results.put(asyncio.run(_hammer(redis_url, barrier, seed, phases)))


async def _hammer(
    redis_url: str, barrier: Any, seed: int, phases: list[dict[str, Any]]
) -> list[Any]:
    rng = random.Random(seed)
    client = Redis.from_url(redis_url)
    limiters = [Limiter(client, p["scope"], Limits(**p["limits"]), slot_ttl_s=10) for p in phases]
    await client.ping()
    barrier.wait(timeout=60)
    start = time.monotonic()
    out = []
    for phase, limiter in zip(phases, limiters, strict=True):
        records: list[tuple[int, int, int]] = []
        end = start + phase["until_s"]

        async def caller(
            limiter: Limiter = limiter, records: list[Any] = records, end: float = end
        ) -> None:
            while time.monotonic() < end:
                reserve = rng.randint(50, 250)
                ticket = await limiter.acquire(reserve, max_wait_s=10)
                await asyncio.sleep(rng.uniform(0.005, 0.03))  # the model call
                used = rng.randint(reserve // 3, reserve)  # never more than reserved
                await limiter.settle(ticket, used)
                records.append((ticket.admitted_at_us, reserve, used))

        await asyncio.gather(*(caller() for _ in range(12)))
        out.append(records)
    await client.aclose()
    return out


def test_processes_sharing_a_budget_stay_inside_the_providers_bucket(redis_url: str) -> None:
    # Given three processes, each with 12 concurrent callers that always want more than the
    # budget, first limited by tokens (with refunds: calls use less than they reserve), then by
    # requests, with a 2-second period so that several periods pass.
    period_s = 2.0
    tpm, rpm = 20_000, 120
    phases = [
        {"scope": "t:mp:tokens", "until_s": 2.5,
         "limits": {"rpm": 100_000, "tpm": tpm, "max_inflight": 100, "period_s": period_s}},
        {"scope": "t:mp:requests", "until_s": 5.0,
         "limits": {"rpm": rpm, "tpm": None, "max_inflight": 100, "period_s": period_s}},
    ]
    barrier, results = SPAWN.Barrier(3), SPAWN.Queue()
    procs = [SPAWN.Process(target=hammer, args=(redis_url, barrier, results, seed, phases))
             for seed in range(3)]

    # When they run at the same time.
    for proc in procs:
        proc.start()
    outputs = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    by_tokens = [r for out in outputs for r in out[0]]
    by_requests = [r for out in outputs for r in out[1]]
    assert {len(out[0]) > 0 for out in outputs} == {True}, "every process was admitted"

    # Then in no window [a, b] did the tokens really used exceed tpm + tpm (b - a) / period,
    # so a provider metering with the same bucket would never have refused one of these calls,
    # and the budget was used: at least 90% of what that bucket allows over the run.
    used = [(at, float(u)) for at, _, u in by_tokens]
    assert worst_excess(used, tpm, period_s) <= 1e-6 * tpm
    span_us = max(at for at, _ in used) - min(at for at, _ in used)
    allowed = tpm + tpm * span_us / (period_s * 1e6)
    assert sum(u for _, u in used) >= 0.9 * allowed
    # Then the same holds for requests when they are the binding limit.
    calls = [(at, 1.0) for at, _, _ in by_requests]
    assert worst_excess(calls, rpm, period_s) <= 1e-6 * rpm
    span_us = max(at for at, _ in calls) - min(at for at, _ in calls)
    assert len(calls) >= 0.9 * (rpm + rpm * span_us / (period_s * 1e6))


def test_window_check_catches_a_burst_over_the_bucket() -> None:
    # Given admissions that respect a bucket of 10 per second, and the same with one extra call.
    fair = [(i * 100_000, 1.0) for i in range(30)] + [(0, 1.0)] * 9
    # When the window check runs / Then it passes the first and catches the second.
    assert worst_excess(fair, 10, 1.0) <= 0
    assert worst_excess([*fair, (50_000, 1.0)], 10, 1.0) >= 1 - 1e-9


# -- reservations, refunds and overruns ----------------------------------------------------------


def test_settle_refunds_unused_tokens_and_charges_overruns(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 1000 tokens per 600 s (refill of 1.7 tokens a second: negligible here).
        limiter = Limiter(client, "t:settle", Limits(rpm=None, tpm=1000, max_inflight=10,
                                                     period_s=600), slot_ttl_s=30)
        # When a call reserves 600 and uses 200.
        ticket = await limiter.acquire(600, max_wait_s=0)
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(400, abs=5)
        await limiter.settle(ticket, 200)
        # Then the 400 it did not use are available again, and its slot is free.
        snap = await limiter.snapshot()
        assert snap["tokens"]["available"] == pytest.approx(800, abs=5)
        assert snap["inflight"] == 0
        assert snap["tokens"]["used"] == 200

        # When a call reserves 700 and uses 900.
        ticket = await limiter.acquire(700, max_wait_s=0)
        await limiter.settle(ticket, 900)
        # Then the overrun is charged: the bucket owes 100, and a small call must wait for it.
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(-100, abs=5)
        with pytest.raises(LimiterBusy) as busy:
            await limiter.acquire(10, max_wait_s=1)
        assert busy.value.reason == "rate"
        assert busy.value.wait_s == pytest.approx(110 * 0.6, rel=0.1)

        # When a call is settled twice.
        await limiter.release(ticket, refund=True)
        # Then nothing more is given back.
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(-100, abs=5)

    run(redis_url, scenario)


def test_providers_that_do_not_refund_are_charged_the_whole_reservation(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given a provider that charges prompt + max_tokens at admission and gives nothing back.
        limits = Limits(rpm=None, tpm=1000, max_inflight=10, period_s=600,
                        refund_unused_tokens=False)
        limiter = Limiter(client, "t:norefund", limits, slot_ttl_s=30)
        # When a call reserves 600, uses 200; another reserves 100 and uses 150.
        await limiter.settle(await limiter.acquire(600, max_wait_s=0), 200)
        await limiter.settle(await limiter.acquire(100, max_wait_s=0), 150)
        # Then the first keeps its 600 charged, the second is charged its overrun.
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(250, abs=5)

    run(redis_url, scenario)


def test_a_refund_returns_only_what_has_not_refilled_yet(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 1000 tokens per 2 s (500 a second) and a call A of 600 that will use nothing,
        # then 0.3 s later a call B of 400 that uses all of it.
        period_s, tpm = 2.0, 1000
        limiter = Limiter(client, "t:fifo", Limits(rpm=None, tpm=tpm, max_inflight=10,
                                                   period_s=period_s), slot_ttl_s=30)
        a = await limiter.acquire(600, max_wait_s=0)
        await asyncio.sleep(0.3)
        b = await limiter.acquire(400, max_wait_s=0)
        await asyncio.sleep(0.2)
        # When A fails without the provider consuming anything.
        await limiter.release(a, refund=True)
        snap = await limiter.snapshot()
        now_us = (await redis_now_s(client)) * 1e6
        # Then we never believe in more than the provider has: its bucket only ever paid for B
        # (A's share of the refill was wasted while it was full), so our availability is at most
        # its level, and within A's already-refilled share (about 100) below it.
        provider = tpm - max(0.0, 400 - (now_us - b.admitted_at_us) / 1e6 * tpm / period_s)
        assert snap["tokens"]["available"] <= provider + 1
        assert snap["tokens"]["available"] >= provider - 120

    run(redis_url, scenario)


def test_a_request_larger_than_the_whole_budget_fails_at_once(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given a budget of 1000 tokens per period.
        limiter = Limiter(client, "t:big", Limits(rpm=None, tpm=1000, max_inflight=10),
                          slot_ttl_s=30)
        # When a request of 1001 tokens asks, willing to wait a long time.
        started = time.monotonic()
        with pytest.raises(RequestTooLargeError) as error:
            await limiter.acquire(1001, max_wait_s=600)
        # Then it fails at once with a message that names both numbers, and holds nothing.
        assert time.monotonic() - started < 1
        assert "1001" in str(error.value) and "1000" in str(error.value)
        assert (await limiter.snapshot())["inflight"] == 0

    run(redis_url, scenario)


# -- waiting ------------------------------------------------------------------------------------


def test_busy_when_the_wait_exceeds_what_the_caller_accepts(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 2 requests per 2 s, both taken.
        limiter = Limiter(client, "t:busy", Limits(rpm=2, tpm=None, max_inflight=10,
                                                   period_s=2.0), slot_ttl_s=30)
        first = await limiter.acquire(1, max_wait_s=0)
        await limiter.acquire(1, max_wait_s=0)
        # When a third asks, accepting 0.2 s of wait while the next request is ~1 s away.
        started = time.monotonic()
        with pytest.raises(LimiterBusy) as busy:
            await limiter.acquire(1, max_wait_s=0.2)
        # Then it is refused at once, told how long it would have had to wait, holding nothing.
        assert time.monotonic() - started < 0.15
        assert busy.value.wait_s == pytest.approx(1.0, abs=0.1)
        snap = await limiter.snapshot()
        assert snap["inflight"] == 2
        assert snap["requests"]["available"] == pytest.approx(0, abs=0.1)
        # When it accepts 1.5 s instead.
        ticket = await limiter.acquire(1, max_wait_s=1.5)
        # Then it is admitted once a request has refilled: one second after the first.
        assert ticket.admitted_at_us >= first.admitted_at_us + 1_000_000 - 1

    run(redis_url, scenario)


def test_waiters_in_one_process_do_not_poll_redis_one_by_one(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 20 requests per second, all taken, and 60 callers of one process queued.
        limiter = Limiter(client, "t:poll", Limits(rpm=20, tpm=None, max_inflight=100,
                                                   period_s=1.0), slot_ttl_s=30)
        for _ in range(20):
            await limiter.acquire(1, max_wait_s=0)
        before = await evalsha_calls(client)
        # When they all wait for capacity (3 s of refill).
        tickets = await asyncio.gather(*(limiter.acquire(1, max_wait_s=5) for _ in range(60)))
        # Then each was admitted with a couple of script calls, not one per caller per refill.
        assert len(tickets) == 60
        assert await evalsha_calls(client) - before <= 3 * 60

    run(redis_url, scenario)


async def evalsha_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_large_request_is_not_starved_by_a_stream_of_small_ones(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 1000 tokens a second, and another process (its own Limiter and connection)
        # whose 8 callers take 100 tokens each whenever they can.
        limits = Limits(rpm=None, tpm=1000, max_inflight=100, period_s=1.0)
        other_client = Redis.from_url(redis_url)
        other = Limiter(other_client, "t:claim", limits, slot_ttl_s=30)
        mine = Limiter(client, "t:claim", limits, slot_ttl_s=30)
        stop = asyncio.Event()

        async def small() -> None:
            while not stop.is_set():
                await other.settle(await other.acquire(100, max_wait_s=5), 100)

        smalls = [asyncio.create_task(small()) for _ in range(8)]
        try:
            await asyncio.sleep(0.5)
            # When a request of 800 tokens asks, ready to wait 3 s.
            started = time.monotonic()
            await mine.acquire(800, max_wait_s=3)
            waited = time.monotonic() - started
        finally:
            stop.set()
            await asyncio.gather(*smalls)
            await other_client.aclose()
        # Then it gets its turn within about the time 800 tokens take to refill.
        assert waited < 1.3

    run(redis_url, scenario)


# -- cool-down ----------------------------------------------------------------------------------

COOL_DOWN_CHILD = """
import asyncio, sys
from redis.asyncio import Redis
from docqueue.workers.provider.admission import Limits
from docqueue.workers.provider.limiter import Limiter

async def main():
    client = Redis.from_url(sys.argv[1])
    limiter = Limiter(client, "t:cool", Limits(rpm=None, tpm=None, max_inflight=10), slot_ttl_s=30)
    seconds, micros = await client.time()
    await limiter.cool_down(float(sys.argv[2]))
    print(seconds * 1_000_000 + micros + float(sys.argv[2]) * 1e6)  # the earliest it can end
    await client.aclose()

asyncio.run(main())
"""


def test_a_cool_down_set_by_one_process_pauses_another(redis_url: str) -> None:
    # Given another process that saw a 429 and set a 2-second cool-down.
    child = subprocess.run([sys.executable, "-c", COOL_DOWN_CHILD, redis_url, "2.0"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30, check=True)
    cool_down_ends_us = float(child.stdout.strip())

    async def scenario(client: Redis) -> tuple[float, Ticket]:
        limiter = Limiter(client, "t:cool", Limits(rpm=None, tpm=None, max_inflight=10),
                          slot_ttl_s=30)
        # When this process asks (there is no other limit at all) during the cool-down.
        asked_us = await redis_now_s(client) * 1e6
        return asked_us, await limiter.acquire(1, max_wait_s=3)

    # Then it is admitted only once the cool-down is over.
    asked_us, ticket = run(redis_url, scenario)
    assert asked_us < cool_down_ends_us - 200_000, "the test asked too late to show anything"
    assert ticket.admitted_at_us >= cool_down_ends_us


def test_a_cool_down_only_ever_extends(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given a 2-second cool-down.
        limiter = Limiter(client, "t:extend", Limits(rpm=60, tpm=1000, max_inflight=10),
                          slot_ttl_s=30)
        await limiter.cool_down(2.0)
        # When another 429 asks for 0.1 s.
        left = await limiter.cool_down(0.1)
        # Then the longer one stands, callers are told so, and the buckets were emptied.
        assert left == pytest.approx(2.0, abs=0.1)
        with pytest.raises(LimiterBusy) as busy:
            await limiter.acquire(1, max_wait_s=0.5)
        assert busy.value.reason == "cool-down"
        snap = await limiter.snapshot()
        assert snap["cool_down_s"] == pytest.approx(2.0, abs=0.1)
        assert snap["tokens"]["available"] == pytest.approx(0, abs=5)

    run(redis_url, scenario)


# -- in-flight slots ----------------------------------------------------------------------------

KILLED_CHILD = """
import asyncio, os, sys
from redis.asyncio import Redis
from docqueue.workers.provider.admission import Limits
from docqueue.workers.provider.limiter import Limiter

async def main():
    client = Redis.from_url(sys.argv[1])
    limiter = Limiter(client, "t:slots", Limits(rpm=None, tpm=None, max_inflight=2),
                      slot_ttl_s=float(sys.argv[2]))
    await limiter.acquire(1, max_wait_s=0)
    await limiter.acquire(1, max_wait_s=0)
    os._exit(0)  # killed mid-call: nothing is settled

asyncio.run(main())
"""


def test_slots_of_a_killed_process_are_reclaimed_after_their_ttl(redis_url: str) -> None:
    # Given a process that took both in-flight slots (ttl 0.6 s) and died.
    subprocess.run([sys.executable, "-c", KILLED_CHILD, redis_url, "0.6"], cwd=ROOT,
                   timeout=30, check=True)

    async def scenario(client: Redis) -> None:
        limiter = Limiter(client, "t:slots", Limits(rpm=None, tpm=None, max_inflight=2),
                          slot_ttl_s=0.6)
        # When this process asks without waiting / Then every slot is taken.
        with pytest.raises(LimiterBusy) as busy:
            await limiter.acquire(1, max_wait_s=0)
        assert busy.value.reason == "in-flight"
        # When it waits / Then it gets both slots once they expire.
        first = await limiter.acquire(1, max_wait_s=2)
        await limiter.acquire(1, max_wait_s=2)
        # When one call finishes / Then its slot is free at once.
        await limiter.settle(first, 1)
        await limiter.acquire(1, max_wait_s=0)

    run(redis_url, scenario)


def test_a_live_process_keeps_its_slots_past_their_ttl(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given a process holding the only in-flight slot (ttl 0.6 s) through a 2 s call
        limits = Limits(rpm=None, tpm=None, max_inflight=1)
        holder = Limiter(client, "t:kept", limits, slot_ttl_s=0.6)
        ticket = await holder.acquire(1, max_wait_s=0)
        other_client = Redis.from_url(redis_url)
        other = Limiter(other_client, "t:kept", limits, slot_ttl_s=0.6)
        try:
            await asyncio.sleep(2.0)
            # Then its slot is still taken: its process renews it while the call runs
            with pytest.raises(LimiterBusy):
                await other.acquire(1, max_wait_s=0)
            # When the call ends / Then the slot is free at once
            await holder.settle(ticket, 1)
            await other.acquire(1, max_wait_s=0)
        finally:
            await other_client.aclose()

    run(redis_url, scenario)


def test_unknown_limits_only_cap_the_calls_in_flight(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given no known rate limits and at most 3 calls in flight.
        limiter = Limiter(client, "t:cap", Limits(rpm=None, tpm=None, max_inflight=3),
                          slot_ttl_s=30)
        # When 3 calls of a million tokens are in flight / Then a fourth must wait.
        tickets = [await limiter.acquire(1_000_000, max_wait_s=0) for _ in range(3)]
        with pytest.raises(LimiterBusy):
            await limiter.acquire(1, max_wait_s=0.05)
        # When one fails / Then the fourth goes.
        await limiter.release(tickets[0], refund=False)
        await limiter.acquire(1, max_wait_s=0)
        snap = await limiter.snapshot()
        assert snap["inflight"] == 3
        assert snap["tokens"]["limit"] is None and snap["tokens"]["available"] is None

    run(redis_url, scenario)


# -- headers ------------------------------------------------------------------------------------

HEADERS = {
    "X-RateLimit-Limit-Requests": "500",
    "X-RateLimit-Limit-Tokens": "10000",
    "X-RateLimit-Remaining-Requests": "499",
    "X-RateLimit-Remaining-Tokens": "9000",
    "X-RateLimit-Reset-Requests": "120ms",
    "X-RateLimit-Reset-Tokens": "6s",
}


def test_limits_learned_from_headers_are_shared_by_every_process(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given two processes (limiters with their own connections) that know no limits.
        limits = Limits(rpm=None, tpm=None, max_inflight=10, period_s=600)
        first = Limiter(client, "t:learn", limits, slot_ttl_s=30)
        second_client = Redis.from_url(redis_url)
        second = Limiter(second_client, "t:learn", limits, slot_ttl_s=30)
        # When the first sees the provider's headers.
        await first.observe(HEADERS)
        # Then the second knows the limits and what the provider said remains.
        snap = await second.snapshot()
        assert snap["requests"]["limit"] == 500 and snap["tokens"]["limit"] == 10_000
        assert snap["requests"]["learned"] == 500 and snap["tokens"]["configured"] is None
        assert snap["tokens"]["available"] == pytest.approx(9000, abs=5)
        assert snap["requests"]["available"] == pytest.approx(499, abs=0.1)
        # Then a request bigger than the learned budget fails at once.
        with pytest.raises(RequestTooLargeError):
            await second.acquire(10_001, max_wait_s=5)
        # When a later response says more remains / Then the view is never loosened.
        await second.observe({**HEADERS, "x-ratelimit-remaining-tokens": "10000"})
        assert (await first.snapshot())["tokens"]["available"] == pytest.approx(9000, abs=5)
        await second_client.aclose()

    run(redis_url, scenario)


def test_configured_limits_are_not_loosened_by_headers(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given limits configured tighter than the provider's.
        limiter = Limiter(client, "t:tight", Limits(rpm=100, tpm=2000, max_inflight=10,
                                                    period_s=600), slot_ttl_s=30)
        # When the provider reports its larger limits.
        await limiter.observe(HEADERS)
        # Then the configured ones stay in force.
        snap = await limiter.snapshot()
        assert snap["requests"]["limit"] == 100 and snap["tokens"]["limit"] == 2000
        assert snap["tokens"]["learned"] == 10_000
        # When the provider reports a limit below the configured one / Then that one applies.
        await limiter.observe({"x-ratelimit-limit-tokens": "1500"})
        assert (await limiter.snapshot())["tokens"]["limit"] == 1500

    run(redis_url, scenario)


def test_remaining_counts_calls_admitted_well_after_the_answered_one(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 10000 tokens per 600 s, a call A of 1000 and, a second later, a call B of 2000.
        limiter = Limiter(client, "t:remaining", Limits(rpm=None, tpm=10_000, max_inflight=10,
                                                        period_s=600), slot_ttl_s=30)
        a = await limiter.acquire(1000, max_wait_s=0)
        await asyncio.sleep(1.0)
        await limiter.acquire(2000, max_wait_s=0)
        # When A's response says 5000 remained when the provider admitted A.
        await limiter.settle(a, 1000, headers={"x-ratelimit-remaining-tokens": "5000"})
        # Then the provider cannot have seen B, sent a second after A: 5000 - 2000 remain, plus
        # the second's refill (we thought 7000).
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(3017, abs=8)
        # When an answer without a known call says 2500 remain / Then we take it as it is.
        await limiter.observe({"x-ratelimit-remaining-tokens": "2500"})
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(2500, abs=5)

    run(redis_url, scenario)


def test_a_burst_answered_out_of_order_lowers_nothing(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given 10000 tokens per 600 s and five calls of 1000 admitted together, which reached
        # the provider in the reverse order (the last admitted here was admitted there first).
        limiter = Limiter(client, "t:burst", Limits(rpm=None, tpm=10_000, max_inflight=10,
                                                    period_s=600), slot_ttl_s=30)
        tickets = [await limiter.acquire(1000, max_wait_s=0) for _ in range(5)]
        # When each answer reports what remained when the provider admitted it
        for i, ticket in enumerate(tickets):
            remaining = 10_000 - (5 - i) * 1000
            await limiter.settle(ticket, 1000,
                                 headers={"x-ratelimit-remaining-tokens": str(remaining)})
        # Then our bucket agrees with the provider's (5000 left), not lower: reading each answer
        # as if the calls after it were unseen would have taken up to 4000 more.
        assert (await limiter.snapshot())["tokens"]["available"] == pytest.approx(5000, abs=5)

    run(redis_url, scenario)


# -- adaptive concurrency -----------------------------------------------------------------------


async def fill(limiter: Limiter) -> list[Ticket]:
    """Take in-flight slots until the limiter refuses one; the tickets taken."""
    tickets = []
    while True:
        try:
            tickets.append(await limiter.acquire(1, max_wait_s=0))
        except LimiterBusy as exc:
            assert exc.reason == "in-flight"  # noqa: PT017 - a loop, not one expected raise
            return tickets


def test_the_adaptive_window_doubles_per_round_trip_then_halves_on_overload(
    redis_url: str,
) -> None:
    async def scenario(client: Redis) -> None:
        # Given an endpoint without rate limits, an adaptive window of 4 (floor 2, cap 64)
        limiter = Limiter(client, "t:aimd", Limits(rpm=None, tpm=None, max_inflight=64,
                                                   adaptive=True, window_start=4,
                                                   window_floor=2), slot_ttl_s=30)
        # Then 4 calls go out and a fifth waits
        first = await fill(limiter)
        assert len(first) == 4
        # When those 4 are answered steadily / Then 8 go out (slow start: +1 per answer)
        for t in first:
            await limiter.settle(t, 1, latency_s=0.1)
        second = await fill(limiter)
        assert len(second) == 8
        # When one call ends overloaded (a 429, a 5xx, a timeout) / Then the window halves
        await limiter.release(second[0], refund=True, overloaded=True)
        assert (await limiter.snapshot())["window"] == 4
        # and, out of slow start, 4 more answers grow it by about one
        for t in second[1:5]:
            await limiter.settle(t, 1, latency_s=0.1)
        assert (await limiter.snapshot())["window"] == 4
        assert 4.9 < float(await client.hget("{t:aimd}:state", "cw") or 0) < 5.1

    run(redis_url, scenario)


def test_a_full_window_with_no_answer_doubles_every_second_up_to_the_cap(
    redis_url: str,
) -> None:
    async def scenario(client: Redis) -> None:
        # Given an endpoint without limits whose calls take longer than a second (none answers
        # during the test), an adaptive window of 8 and a cap of 32
        limiter = Limiter(client, "t:aimd-ramp", Limits(rpm=None, tpm=None, max_inflight=32,
                                                        adaptive=True, window_start=8),
                          slot_ttl_s=30)
        started = time.monotonic()
        taken = await fill(limiter)
        assert len(taken) == 8
        # When calls keep waiting for a slot
        reached: list[tuple[float, int]] = []
        while len(taken) < 32 and time.monotonic() - started < 10:
            more = await fill(limiter)
            taken += more
            if more:
                reached.append((time.monotonic() - started, len(taken)))
            await asyncio.sleep(0.02)
        # Then the window doubled once a second while full (8, 16, 32): the cap within two
        # seconds and a little, where slow start on answers would take two round trips
        assert [n for _, n in reached] == [16, 32], reached
        assert 0.95 <= reached[0][0] < 1.6, reached
        assert 1.95 <= reached[1][0] < 3.0, reached
        assert (await limiter.snapshot())["window"] == 32

    run(redis_url, scenario)


def test_time_grows_the_window_neither_after_an_overload_nor_for_fast_answers(
    redis_url: str,
) -> None:
    async def scenario(client: Redis) -> None:
        # Given two endpoints without limits, each at a full adaptive window of 4 (cap 64):
        # one answered in 100 ms, one that answered 429 (slow start over)
        fast = Limiter(client, "t:aimd-fast", Limits(rpm=None, tpm=None, max_inflight=64,
                                                     adaptive=True, window_start=4),
                       slot_ttl_s=30)
        await fast.settle(await fast.acquire(1, max_wait_s=0), 1, latency_s=0.1)
        assert len(await fill(fast)) == 5
        hurt = Limiter(client, "t:aimd-hurt", Limits(rpm=None, tpm=None, max_inflight=64,
                                                     adaptive=True, window_start=8),
                       slot_ttl_s=30)
        taken = await fill(hurt)
        await hurt.release(taken.pop(), refund=True, overloaded=True)
        assert len(taken) == 7 and (await limiter_window(hurt)) == 4
        # When both stay full for 1.5 s, looked at as waiters do
        for _ in range(30):
            for limiter in (fast, hurt):
                with pytest.raises(LimiterBusy):
                    await limiter.acquire(1, max_wait_s=0)
            await asyncio.sleep(0.05)
        # Then neither window grew: answers pace the first, the overload ended the second's
        # slow start
        assert await limiter_window(fast) == 5
        assert await limiter_window(hurt) == 4

    run(redis_url, scenario)


async def limiter_window(limiter: Limiter) -> int:
    window = (await limiter.snapshot())["window"]
    assert isinstance(window, int)
    return window


def test_rising_latency_takes_a_fifth_off_the_adaptive_window(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given a window of 20 grown on answers of 100 ms
        limiter = Limiter(client, "t:aimd-latency", Limits(rpm=None, tpm=None, max_inflight=64,
                                                           adaptive=True, window_start=10),
                          slot_ttl_s=30)
        for _ in range(10):
            await limiter.settle(await limiter.acquire(1, max_wait_s=0), 1, latency_s=0.1)
        assert (await limiter.snapshot())["window"] == 20
        # When answers start taking 400 ms (the server queues)
        for _ in range(6):
            await limiter.settle(await limiter.acquire(1, max_wait_s=0), 1, latency_s=0.4)
        # Then the window shrank by a fifth once (one decrease per round trip), then grows again
        window = (await limiter.snapshot())["window"]
        assert 16 <= window < 20, window

    run(redis_url, scenario)


@pytest.mark.parametrize("server", ["latency not the output's", "10 ms an output token"])
def test_answers_of_another_length_are_not_mistaken_for_a_queue(
    redis_url: str, server: str
) -> None:
    timing = {"latency not the output's": lambda tokens: 1.0,
              "10 ms an output token": lambda tokens: tokens / 100}[server]

    async def scenario(client: Redis) -> None:
        # Given an adaptive window of 10 (cap 64) before a server of either kind
        limiter = Limiter(client, "t:aimd-length", Limits(rpm=None, tpm=None, max_inflight=64,
                                                          adaptive=True, window_start=10),
                          slot_ttl_s=30)

        async def answers(n: int, slower: float = 1.0) -> None:
            for i in range(n):  # five long answers, five short ones, and again: 190, 10 tokens
                tokens = 10 if (i // 5) % 2 else 190
                await limiter.settle(await limiter.acquire(1, max_wait_s=0), 1, output_key="k",
                                     output_tokens=tokens, latency_s=timing(tokens) * slower)

        # When 60 answers come back, long and short
        await answers(60)
        # Then none is read as a queue: the window grew to its cap and stays there
        assert (await limiter.snapshot())["window"] == 64
        # When the same answers take twice as long (a queue) / Then the window shrinks
        await answers(10, slower=2.0)
        assert (await limiter.snapshot())["window"] < 64

    run(redis_url, scenario)


def test_auto_adaptive_concurrency_steps_aside_once_the_provider_states_its_limits(
    redis_url: str,
) -> None:
    async def scenario(client: Redis) -> None:
        # Given adaptive concurrency in auto mode, a window of 3, no limit known
        limiter = Limiter(client, "t:aimd-auto", Limits(rpm=None, tpm=None, max_inflight=10,
                                                        adaptive=None, window_start=3),
                          slot_ttl_s=30)
        taken = await fill(limiter)
        assert len(taken) == 3
        # When answers without headers come back (the adaptive state keeps its own fields)
        for t in taken[1:]:
            await limiter.settle(t, 1, latency_s=0.1)
        taken = [taken[0], *await fill(limiter)]
        # Then the window still holds (slow start: 3 + 2 answers)
        assert len(taken) == 5
        # When an answer states the provider's limits / Then only the in-flight cap holds
        await limiter.settle(taken[0], 1, headers=HEADERS, latency_s=0.1)
        assert len(await fill(limiter)) == 10 - 4

    run(redis_url, scenario)


# -- output sizes -------------------------------------------------------------------------------


def test_expected_output_is_a_shared_moving_average_with_a_margin(redis_url: str) -> None:
    async def scenario(client: Redis) -> None:
        # Given two processes and no output recorded yet.
        limits = Limits(rpm=None, tpm=None, max_inflight=10)
        first = Limiter(client, "t:out", limits, slot_ttl_s=30)
        second_client = Redis.from_url(redis_url)
        second = Limiter(second_client, "t:out", limits, slot_ttl_s=30)
        # Then the default is used, capped by max_tokens.
        assert await first.expected_output_tokens("summary-v1", cap=256, default=128) == 128
        assert await first.expected_output_tokens("summary-v1", cap=100, default=128) == 100
        # When the first records outputs of exactly 40 tokens (one through a settle).
        for _ in range(9):
            await first.record_output_tokens("summary-v1", 40)
        ticket = await first.acquire(10, max_wait_s=0)
        await first.settle(ticket, 50, output_key="summary-v1", output_tokens=40)
        # Then the second expects 40 (no spread, no margin), and the cap still applies.
        assert await second.expected_output_tokens("summary-v1", cap=256, default=128) == 40
        assert await second.expected_output_tokens("summary-v1", cap=30, default=128) == 30
        # When sizes vary between 20 and 60.
        for size in [20, 60] * 50:
            await second.record_output_tokens("summary-v1", size)
        # Then the estimate is their mean plus a margin of two spreads (sd 20): about 80.
        assert 70 <= await second.expected_output_tokens("summary-v1", cap=256, default=1) <= 90
        # Then another pipeline key is separate.
        assert await second.expected_output_tokens("other", cap=256, default=7) == 7
        await second_client.aclose()

    run(redis_url, scenario)
