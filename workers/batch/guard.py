"""Stop a job's model calls when it is cancelled or its budget is spent.

The stop flag and the spend counters live in Redis so that every worker sees them within a
fraction of a second; they are primed from the store, so losing Redis loses no spend.
"""

from __future__ import annotations

import enum
from typing import Any

from docqueue.workers import keys
from docqueue.workers.clock import monotonic_s

STOP_POLL_S = 0.5


class StopReason(enum.StrEnum):
    """Why a job makes no further model call; the value is what the job's stop key holds."""

    CANCELLED = "cancelled"  # `docq cancel`
    BUDGET = "budget"  # a token or cost budget was spent




class JobGuard:
    """Answers "may this job make another model call?" and counts what its calls spend."""

    def __init__(
        self, redis: Any, job_id: int, budget_tokens: int | None, budget_cost: float | None
    ) -> None:
        self.redis, self.job_id = redis, job_id
        self.budget_tokens, self.budget_cost = budget_tokens, budget_cost
        self._reason: StopReason | None = None
        self._checked = -1e9

    @property
    def has_budget(self) -> bool:
        return self.budget_tokens is not None or self.budget_cost is not None

    async def prime(self, tokens: int, cost: float) -> None:
        """Seed the counters from the store if Redis has none (first batch, or Redis lost)."""
        if self.has_budget:
            tokens_key, cost_key = keys.job_spend(self.job_id)
            await self.redis.set(tokens_key, tokens, nx=True)
            await self.redis.set(cost_key, repr(cost), nx=True)

    async def stop_reason(self) -> StopReason | None:
        """Why the job stopped, or None. With a budget, Redis is read before every call;
        without one (only a cancel can stop the job), at most every STOP_POLL_S."""
        due = self.has_budget or monotonic_s() - self._checked > STOP_POLL_S
        if self._reason is None and due:
            self._checked = monotonic_s()
            value = await self.redis.get(keys.job_stop(self.job_id))
            self._reason = StopReason(value.decode()) if value else None
        return self._reason

    async def spend(self, tokens: int, cost: float | None) -> None:
        """Count one call's spend; past the budget, stop every worker's further calls."""
        if not self.has_budget:
            return
        tokens_key, cost_key = keys.job_spend(self.job_id)
        total_tokens = await self.redis.incrby(tokens_key, tokens)
        total_cost = float(await self.redis.incrbyfloat(cost_key, cost or 0.0))
        over_tokens = self.budget_tokens is not None and total_tokens >= self.budget_tokens
        over_cost = self.budget_cost is not None and total_cost >= self.budget_cost
        if over_tokens or over_cost:
            await self.redis.set(keys.job_stop(self.job_id), StopReason.BUDGET, nx=True)
            self._reason = StopReason.BUDGET

    async def refund(self, tokens: int, cost: float) -> None:
        """Take back the spend of calls whose results were not recorded (fenced off): the
        counters hold what the job's results hold. A stop it caused stands (it erred safe)."""
        if not self.has_budget or (not tokens and not cost):
            return
        tokens_key, cost_key = keys.job_spend(self.job_id)
        await self.redis.incrby(tokens_key, -tokens)
        await self.redis.incrbyfloat(cost_key, -cost)
