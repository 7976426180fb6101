"""The limiter's Lua scripts in a real Redis, driven by hypothesis, against a reference model.

The bucket arithmetic lives in workers/provider/lua/ and runs on Redis's clock, so it has no
pure Python twin to compare with in the unit tier; here a few generated call sequences
(sizes, overruns, pauses) go through the real `Limiter`, and every admission is replayed on a
small model of the documented contract (workers/provider/limiter.py): per dimension a bucket of
capacity L, starting full, refilled at L per period, from which each admitted call takes its
reservation, and an overrun its excess when settled.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from docqueue.workers.provider.admission import Limits
from docqueue.workers.provider.limiter import Limiter

pytestmark = pytest.mark.integration

PERIOD_S = 0.5
TPM, RPM = 100, 3  # per PERIOD_S
# Redis's clock is read in microseconds and refill is continuous: allow a microsecond's refill.
SLACK = 1e-6 * TPM


@dataclass(frozen=True)
class Admitted:
    at_us: int  # Redis's clock, from the ticket
    tokens: int  # reserved
    charged: int  # what the provider is charged once settled: max(used, reserved)


class ReferenceBucket:
    """Capacity `limit`, starting full, refilled continuously at `limit` per period."""

    def __init__(self, limit: float, period_us: float) -> None:
        self.limit, self.rate = limit, limit / period_us
        self.level = float(limit)
        self.at_us: int | None = None

    def at(self, now_us: int) -> float:
        if self.at_us is not None:
            self.level = min(self.limit, self.level + (now_us - self.at_us) * self.rate)
        self.at_us = now_us
        return self.level


def replay(calls: list[Admitted], limit: float, cost: str) -> list[float]:
    """The model's level just before each admission, after taking the earlier calls' charges
    (an overrun is taken at its call's admission: earlier than the limiter takes it, which
    leaves the model more to give when the bucket would have refilled to the brim)."""
    model = ReferenceBucket(limit, PERIOD_S * 1e6)
    levels = []
    for call in calls:
        levels.append(model.at(call.at_us))
        model.level -= 1 if cost == "requests" else call.charged
    return levels


calls_strategy = st.lists(
    st.tuples(st.integers(1, TPM), st.integers(0, TPM + 30), st.integers(0, 200)),
    min_size=1, max_size=6,
)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=calls_strategy)
def test_every_admission_fits_the_reference_bucket(
    redis_url: str, calls: list[tuple[int, int, int]]
) -> None:
    # (The Redis DB is flushed around the test, not between examples: each takes a new scope.)
    # Given a fresh scope of 100 tokens and 3 requests per half second, charged prompt + max_tokens
    # at admission (no refunds) and overruns at settle time
    limits = Limits(rpm=RPM, tpm=TPM, max_inflight=4, period_s=PERIOD_S,
                    refund_unused_tokens=False)

    async def drive() -> list[Admitted]:
        client = Redis.from_url(redis_url)
        limiter = Limiter(client, f"t:model-{uuid.uuid4().hex[:8]}", limits, slot_ttl_s=30)
        admitted = []
        try:
            for tokens, used, pause_ms in calls:
                # When each call asks for its reservation, uses `used` tokens and settles
                await asyncio.sleep(pause_ms / 1000)
                ticket = await limiter.acquire(tokens, max_wait_s=10)
                await limiter.settle(ticket, used)
                admitted.append(Admitted(ticket.admitted_at_us, tokens, max(used, tokens)))
        finally:
            await limiter.aclose()
            await client.aclose()
        return admitted

    admitted = asyncio.run(drive())
    # Then the model had each call's whole reservation (and its request) when it was admitted
    for call, level in zip(admitted, replay(admitted, TPM, "tokens"), strict=True):
        assert level >= call.tokens - SLACK, (call, level, admitted)
    for call, level in zip(admitted, replay(admitted, RPM, "requests"), strict=True):
        assert level >= 1 - 1e-6 * RPM, (call, level, admitted)
    # and no window [a, b] was charged more than the bucket's envelope L + L (b - a) / P
    for i, first in enumerate(admitted):
        charged = 0
        for later in admitted[i:]:
            charged += later.tokens
            span_s = (later.at_us - first.at_us) / 1e6
            assert charged <= TPM + TPM * span_s / PERIOD_S + SLACK, admitted
