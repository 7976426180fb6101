"""The result writer: a delivery's result rows, upserted in bulk, never lost to a store outage.

Guarantees: rows are written in the order they were added, a few times a second or every
`FLUSH_ROWS`; a flush the store refuses (a restart, a failover) keeps the rows in memory, in
order, and tries again with backoff for as long as a batch's budget before the error goes up.
Rows the lease fence keeps out (another delivery took their chunks over) are not recorded, and
their spend is refunded to the job's guard; their paid answers still go to the response cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from docqueue.workers.batch import cache, leases
from docqueue.workers.batch.guard import JobGuard
from docqueue.workers.batch.leases import ResultRow
from docqueue.workers.batch.services import Services
from docqueue.workers.clock import monotonic_s
from docqueue.workers.provider.retry import backoff_s

logger = logging.getLogger(__name__)

FLUSH_ROWS, FLUSH_EVERY_S = 200, 0.25


def store_unreachable(exc: DBAPIError) -> bool:
    """The store could not be reached or dropped the connection (a restart, or a transaction
    it ended after this process was frozen in it): the same write may succeed again."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


class ResultWriter:
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
        self.last = monotonic_s()
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
        if len(self.rows) >= FLUSH_ROWS or monotonic_s() - self.last > FLUSH_EVERY_S:
            await self.flush()

    async def flush(self) -> None:
        async with self._flushing:
            failures, written, give_up = 0, 0, monotonic_s() + self.store_retry_s
            while self.rows:
                rows, self.rows, self.last = self.rows, [], monotonic_s()
                entries, self.cache = self.cache, []
                try:
                    dropped = await self.svc.db(
                        functools.partial(self._write, rows=rows, entries=entries))
                except DBAPIError as exc:
                    if not store_unreachable(exc):
                        raise
                    self.rows[:0], self.cache[:0] = rows, entries  # keep them, in order
                    left = give_up - monotonic_s()
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
