"""Process one batch: call the model for each unfinished chunk and record one row per chunk.

Step 2 of the flow in docs/ARCHITECTURE.md. Runs inside the worker process's event loop;
database work goes to a thread so the loop keeps its calls in flight.

A delivery is alive while its heartbeat is (workers/batch/liveness.py): it registers before
its first claim and ends its heartbeat when it returns. Chunks held by a delivery whose
heartbeat is gone are claimed at once; a delivery whose own heartbeat lapsed (its process was
frozen or cut off from Redis for a TTL) starts no further call, hands its batch on, and what it
still writes is fenced by its lease: a result another delivery recorded is never overwritten
and its spend is not counted twice.

The parts: `services.py` (what a delivery needs from its process), `calls.py` (one chunk's
call and its row), `writer.py` (the result writer); this module is a delivery's loop: claim,
take over from dead deliveries, one pass of calls, hand back or finish. The chunks that were
in flight in two dead deliveries come back as suspects (workers/batch/leases.py): they are
worked after the others, one at a time, each leased alone (one in flight per process:
`Services.alone`), and one whose worker died `max_deliveries` times with it in flight, once
at least with it alone, is recorded as failed without a call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from docqueue.models import JobStatus, ResultStatus
from docqueue.workers import metrics
from docqueue.workers.batch import cache, leases
from docqueue.workers.batch.cache import CachePolicy
from docqueue.workers.batch.calls import (
    CANCELLED_MESSAGE,
    Call,
    Pause,
    cached_row,
    call_model,
    prepare,
)
from docqueue.workers.batch.guard import JobGuard
from docqueue.workers.batch.leases import BatchInfo
from docqueue.workers.batch.liveness import batch_deaths
from docqueue.workers.batch.services import Outcome, Services
from docqueue.workers.batch.writer import ResultWriter
from docqueue.workers.clock import monotonic_s
from docqueue.workers.pipelines import Pipeline
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

INLINE_WAIT_S = 5.0  # a retry due sooner than this waits in the task; later ones re-queue it
HELD_POLL_S = 1.0
LAPSED_RETRY_S = 1.0  # a lapsed delivery's message comes back this soon, to find its batch taken


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
        # Read the batch and take the first claim in one transaction (a round trip less per
        # batch); a batch that will not be worked is not claimed.
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
        return Outcome("done", reason=reason)
    deadline = monotonic_s() + budget_s
    pipeline = svc.pipeline(info)
    guard = JobGuard(svc.redis, info.job_id, info.budget_tokens, info.budget_cost,
                     refused=svc.refused)
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
        if not claim.items and claim.suspects:
            async with svc.alone:
                causes = await _death_causes(svc, info.batch_id)
                alone = await svc.db(functools.partial(
                    _lease_suspect, cfg=cfg, info=info, owner=owner, chunk_id=claim.suspects[0],
                    dead=dead, expiry_counts=expiry_counts, causes=causes))
                # None: failed as poison, or taken by another delivery; claim again
                outcome = None if alone is None else await _work(svc, info, pipeline, guard,
                                                                 alone, owner, deadline)
        else:
            outcome = await _work(svc, info, pipeline, guard, claim, owner, deadline)
        if outcome is not None:
            await svc.db(lambda s: leases.end_delivery(s, info, owner, done=False))
            return outcome
        claim = None


def _not_to_work(cfg: Settings, info: BatchInfo) -> tuple[str, str, str] | None:
    """Why this delivery closes the batch without calling the model (reason, status, message)."""
    if info.job_status == JobStatus.CANCELLED:
        return "cancelled", ResultStatus.CANCELLED, CANCELLED_MESSAGE
    return None


async def _death_causes(svc: Services, batch_id: int) -> list[str]:
    """What `docq worker` saw of the deaths of the batch's deliveries; [] when Redis cannot say
    (it is only for a poison chunk's error message)."""
    if svc.redis is None:
        return []
    try:
        return await batch_deaths(svc.redis, batch_id)
    except Exception as exc:
        logger.warning("batch %s: cannot read how its workers died: %s: %s", batch_id,
                       type(exc).__name__, exc)
        return []


def _lease_suspect(session: Session, cfg: Settings, info: BatchInfo, owner: str, chunk_id: int,
                   dead: set[str], expiry_counts: bool,
                   causes: Sequence[str] = ()) -> leases.Claim | None:
    """Lease one suspect alone, as a claim of that chunk; None if it is not ours to work (held
    by a live delivery, or final), or if it is poison: then its error row is written here."""
    suspect = leases.lease_alone(session, info, owner, chunk_id, cfg.lease_s, dead=dead,
                                 expiry_counts=expiry_counts)
    if suspect is None:
        return None
    if suspect.deaths >= cfg.max_deliveries and suspect.deaths_alone:
        item = suspect.item
        message = poison_message(suspect, causes)
        logger.error("batch %s: %s", info.batch_id, message)
        row = leases.blank_result(item.chunk_id, info.job_id, item.document_id, item.attempts)
        leases.record(session, info.pipeline_version, [row | {
            "status": ResultStatus.ERROR, "error_type": POISON_ERROR, "error_message": message,
        }], owner=owner)
        return None
    return leases.Claim(items=[suspect.item], unfinished=1, held_elsewhere=0)


POISON_ERROR = "PoisonChunk"


def poison_message(suspect: leases.Suspect, causes: Sequence[str] = ()) -> str:
    """What a poison chunk's error says: which chunk, and what is known of the deaths.

    `causes`: what the supervisor of the dead processes saw (`docq worker`), newest first; a
    worker whose supervisor died with it (or a plain Celery worker) leaves none."""
    item = suspect.item
    where = f"document {item.document_id} chunk {suspect.seq}"
    if item.level:
        where += f" (reduce level {item.level})"
    if causes:
        seen = "; ".join(causes[:suspect.deaths])
        known = f"docq worker saw its batch's deliveries die, newest first: {seen}"
        if "SIGKILL" in seen:
            known += " (SIGKILL: the kernel's OOM killer, or an operator)"
    else:
        known = ("its heartbeat stopped and no supervisor saw how: the process was killed, e.g. "
                 "by a signal, the hard time limit or the memory limit")
    return (f"{where}: the worker handling it died {suspect.deaths} times "
            f"({suspect.deaths_alone} with this chunk alone in flight; {known}); recorded as "
            f"failed and not sent again")


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
        if monotonic_s() + HELD_POLL_S > deadline:
            return Outcome("retry", svc.settings.lease_s, "chunks held by another delivery")
        await asyncio.sleep(HELD_POLL_S)
        return None
    if not ready:
        due = min(w.not_before for w in waiting if w.not_before is not None)
        wait = max(0.0, (due - t).total_seconds())
        if wait > INLINE_WAIT_S or monotonic_s() + wait > deadline:
            await svc.db(lambda s: leases.release(s, [w.chunk_id for w in waiting], owner))
            return Outcome("retry", wait, "waiting for retry backoff",
                           svc.troubles.current(info.job_id) if svc.troubles else None)
        await asyncio.sleep(wait)
        return None

    writer = ResultWriter(svc, info.pipeline_version,
                          refresh=info.cache_policy == CachePolicy.REFRESH, owner=owner,
                          guard=guard)
    metrics.current_pipeline.set(info.pipeline)  # the label of this pass's calls
    busy: list[Pause] = []

    def lapsed() -> bool:
        return svc.heartbeat is not None and svc.heartbeat.lapsed(owner)

    calls = [prepare(svc, info, pipeline, w) for w in ready]
    if info.cache_policy == CachePolicy.USE:
        hits = await svc.db(lambda s: cache.lookup(s, [c.key for c in calls]))
        for c in [c for c in calls if c.key in hits]:
            await writer.add(cached_row(info, c, *hits[c.key]))
        misses = [c for c in calls if c.key not in hits]
        metrics.cache_hits(svc.settings.model_name, info.pipeline, len(calls) - len(misses))
        calls = misses

    async def one(call: Call) -> None:
        if busy or monotonic_s() > deadline or lapsed():
            return
        row = await call_model(svc, info, pipeline, guard, call, busy, lapsed, deadline)
        if row is None:
            return
        cache_entry = None
        if row["status"] == ResultStatus.OK and info.cache_policy != CachePolicy.OFF:
            cache_entry = {"key": call.key, "output": row["output"],
                           "model": svc.settings.model_name,
                           "finish_reason": row["finish_reason"],
                           "tokens_in": row["tokens_in"], "tokens_out": row["tokens_out"]}
        await writer.add(row, cache_entry)

    await asyncio.gather(*(one(c) for c in calls))
    await writer.flush()
    if busy or monotonic_s() > deadline or lapsed():
        # Hand the slot back: the chunks not done yet go to the next delivery.
        await svc.db(lambda s: leases.release(s, [w.chunk_id for w in claim.items], owner))
        if lapsed():
            return Outcome("retry", LAPSED_RETRY_S, "this delivery's heartbeat lapsed")
        if busy:
            longest = max(busy, key=lambda p: p.wait_s)
            trouble = next((p.trouble for p in busy if p.trouble is not None), None)
            return Outcome("retry", longest.wait_s, longest.reason, trouble)
        return Outcome("retry", 0.0, "batch time budget used")
    return None
