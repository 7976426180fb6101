"""Stop a job's model calls when it is cancelled, its budget is spent or its key is refused.

The stop flag and the spend counters live in Redis so that every worker sees them within a
fraction of a second; they are primed from the store, so losing Redis loses no spend.

A refused key (401, 403) stops the job at once in its own process: the process's guards share
the set of jobs it saw refused (`Services.refused`), and a guard of such a job reads the stop
flag before every call instead of every STOP_POLL_S. Other processes see the flag within
STOP_POLL_S, or at their own first refusal. What the endpoint said is kept beside the flag
(`keys.job_refusal`), so the chunks that are not sent fail with the same reason.

The same read fetches the job's trouble record (batch/trouble.py) beside the flag, in one MGET:
a call that succeeds after the guard saw one clears it, though another process wrote it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from docqueue.workers import keys
from docqueue.workers.clock import monotonic_s
from docqueue.workers.errors import AuthenticationRefusedError

STOP_POLL_S = 0.5
REFUSAL_TTL_S = 7 * 86_400  # kept past any job's life: `docq retry` deletes it


class StopReason(enum.StrEnum):
    """Why a job makes no further model call; the value is what the job's stop key holds."""

    CANCELLED = "cancelled"  # `docq cancel`
    BUDGET = "budget"  # a token or cost budget was spent
    REFUSED = "refused"  # the endpoint refused the API key (401, 403)


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the endpoint said when it refused the key: the unsent chunks fail with it."""

    error_type: str
    message: str
    http_status: int | None

    @classmethod
    def of(cls, exc: AuthenticationRefusedError) -> Refusal:
        return cls(type(exc).__name__, str(exc), exc.http_status)

    def dumps(self) -> str:
        return json.dumps({"error_type": self.error_type, "message": self.message,
                           "http_status": self.http_status})

    @classmethod
    def loads(cls, raw: bytes | str | None) -> Refusal:
        """The refusal kept in Redis; a generic one when it is gone or unreadable."""
        try:
            data = json.loads(raw or "")
            return cls(str(data["error_type"]), str(data["message"]), data.get("http_status"))
        except (ValueError, KeyError, TypeError):
            return cls(AuthenticationRefusedError.__name__, "the endpoint refused the API key",
                       None)


class JobGuard:
    """Answers "may this job make another model call?" and counts what its calls spend."""

    def __init__(
        self, redis: Any, job_id: int, budget_tokens: int | None, budget_cost: float | None,
        refused: set[int] | None = None,
    ) -> None:
        self.redis, self.job_id = redis, job_id
        self.budget_tokens, self.budget_cost = budget_tokens, budget_cost
        # The jobs this process saw refused, shared by its guards (Services.refused).
        self.refused = refused if refused is not None else set()
        self.refusal: Refusal | None = None  # set with StopReason.REFUSED
        # The job's trouble record (batch/trouble.py) was there at the last read: the next
        # successful call clears it, whoever wrote it.
        self.trouble_seen = False
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
        """Why the job stopped, or None. With a budget, or once this process saw the job's key
        refused, Redis is read before every call; otherwise (only a cancel can stop the job)
        at most every STOP_POLL_S."""
        seen_refused = self.job_id in self.refused
        due = self.has_budget or seen_refused or monotonic_s() - self._checked > STOP_POLL_S
        if self._reason is None and due:
            self._checked = monotonic_s()
            value, trouble = await self.redis.mget(keys.job_stop(self.job_id),
                                                   keys.job_trouble(self.job_id))
            self._reason = StopReason(value.decode()) if value else None
            self.trouble_seen = trouble is not None
            if self._reason == StopReason.REFUSED:
                self.refusal = Refusal.loads(await self.redis.get(keys.job_refusal(self.job_id)))
            elif seen_refused:  # `docq retry` lifted it
                self.refused.discard(self.job_id)
        return self._reason

    def take_trouble_seen(self) -> bool:
        """Whether a trouble record was seen since the last call that cleared it; once."""
        seen, self.trouble_seen = self.trouble_seen, False
        return seen

    async def refuse(self, exc: AuthenticationRefusedError) -> None:
        """The endpoint refused the key: the job makes no further call, in any process. A
        cancel or a spent budget already recorded stands."""
        refusal = Refusal.of(exc)
        await self.redis.set(keys.job_refusal(self.job_id), refusal.dumps(), ex=REFUSAL_TTL_S)
        await self.redis.set(keys.job_stop(self.job_id), StopReason.REFUSED, nx=True)
        self.refused.add(self.job_id)
        if self._reason is None:
            self._reason, self.refusal = StopReason.REFUSED, refusal

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
