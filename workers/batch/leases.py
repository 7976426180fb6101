"""The SQL side of one batch: claim chunks under a lease, record results, close the batch.

A chunk is sent to the model only by the delivery that holds its lease, and only while it has
no final result; results are upserted so that a final row is never overwritten.

Who holds a lease is decided with the owners' heartbeats (workers/batch/liveness.py): the
caller passes the owners known to be dead, whose leases are free at once, and says whether
expiry counts (only when liveness cannot be read). A delivery writes its result rows only for
the chunks whose lease it still holds, checked under a row lock in the write's own transaction
(the fence): a delivery that was frozen while another took its chunks over writes nothing.

The poison guard is per chunk. A claim that takes a chunk over from another owner (dead, or
expired) counts a death on it (`Chunk.deaths`, and `deaths_alone` when that owner held it
alone): only the chunks a dying delivery had in flight are marked. A chunk in flight in
`SUSPECT_DEATHS` deaths, a suspect, is not worked with its batch any more: the claim hands it
back, and the delivery leases it alone (`lease_alone`) once its other chunks are done, so a
death while it is handled implicates it and nothing else. Innocent chunks of a batch that
keeps landing on dying workers finish.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NotRequired, TypedDict

from sqlalchemy import Boolean, and_, bindparam, case, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from docqueue.models import (
    FINAL_RESULT_STATES,
    Batch,
    BatchStatus,
    Chunk,
    Job,
    Result,
    ResultStatus,
    plan_for_now,
    table_of,
    upsert_statement,
)
from docqueue.workers.clock import as_utc, utc_now

# Deaths that make a chunk a suspect. One is every chunk a crashed worker had in flight: taken
# alone, a batch's chunks would be called one after another, and one crash would slow every
# batch it hit to a call at a time (a frozen worker's 16 chunks were called again over 56 s,
# against 10-14 s). A second death with the chunk in flight is rare unless the chunk is at fault.
SUSPECT_DEATHS = 2

RESULT_COLUMNS = (
    "job_id",
    "document_id",
    "status",
    "output",
    "error_type",
    "error_message",
    "http_status",
    "finish_reason",
    "tokens_in",
    "tokens_in_cached",
    "tokens_out",
    "cost",
    "latency_ms",
    "attempts",
    "cached",
    "not_before",
    "updated_at",
)


@dataclass(frozen=True, slots=True)
class BatchInfo:
    batch_id: int
    job_id: int
    seq: int
    job_status: str
    pipeline: str
    pipeline_version: str
    options: dict[str, Any]
    cache_policy: str
    budget_tokens: int | None
    budget_cost: float | None
    service_tier: str | None = None  # sent with each call; prices it (settings.Price.rates)


@dataclass(frozen=True, slots=True)
class WorkItem:
    chunk_id: int
    document_id: int
    text: str
    token_count: int
    attempts: int
    not_before: datetime | None
    level: int = 0  # above 0: a reduce step (workers/jobs/reducing.py)


@dataclass(frozen=True, slots=True)
class Claim:
    items: list[WorkItem]
    unfinished: int  # chunks of the batch without a final result, claimed or not
    held_elsewhere: int  # of those, leased by another delivery
    holders: frozenset[str] = frozenset()  # the owners of those leases
    suspects: tuple[int, ...] = ()  # chunk ids free to lease alone (SUSPECT_DEATHS or more)


@dataclass(frozen=True, slots=True)
class Suspect:
    """A suspect chunk leased alone, with its record of deaths."""

    item: WorkItem
    seq: int  # the chunk's place in its document (at its level)
    deaths: int  # deliveries that died with it in flight
    deaths_alone: int  # of those, deliveries that held it alone


def now() -> datetime:
    return utc_now()


def start_delivery(session: Session, batch_id: int) -> BatchInfo | None:
    """Stamp the batch as started (a level no delivery started is sent again:
    jobs/merging.py `never_started`) and read what it needs; None if unknown."""
    session.execute(update(Batch).where(Batch.id == batch_id).values(updated_at=now()))
    row = session.execute(
        select(
            Batch.id,
            Batch.job_id,
            Batch.seq,
            Job.status,
            Job.pipeline,
            Job.pipeline_version, Job.options, Job.cache_policy, Job.budget_tokens,
            Job.budget_cost, Job.service_tier,
        )
        .join(Job, Job.id == Batch.job_id)
        .where(Batch.id == batch_id)
    ).one_or_none()
    return BatchInfo(*row) if row else None


def end_delivery(session: Session, info: BatchInfo, owner: str, *, done: bool) -> None:
    """A delivery that ends cleanly gives up its leases; `done` closes the batch."""
    values: dict[str, Any] = {"updated_at": now()}
    if done:
        values["status"] = BatchStatus.DONE
    session.execute(update(Batch).where(Batch.id == info.batch_id).values(**values))
    if done:
        # Every chunk is final: no claim or reconcile looks at its lease again, and `docq retry`
        # clears the leases of what it reopens. Not rewriting the rows saves PostgreSQL a new
        # version of every chunk (text included) per batch.
        return
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == info.job_id, Chunk.batch_seq == info.seq,
               Chunk.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
    )


def _is_final(version: str) -> Any:
    # Its own alias: a query that also joins results must not correlate this one away.
    final = aliased(Result)
    return exists().where(
        final.chunk_id == Chunk.id,
        final.pipeline_version == version,
        final.status.in_(FINAL_RESULT_STATES),
    )


@dataclass(frozen=True)
class _ClaimStatements:
    take: Any
    counts: Any
    holders: Any
    items: Any
    take_alone: Any


@functools.cache
def _claim_statements() -> _ClaimStatements:
    """`claim`'s statements, built once: building them anew (an alias of `results`, the
    clauses, their cache keys) cost more of a worker's CPU than running them, 4-5 ms a batch
    (benchmarks/bench_limit.py zero-latency, py-spy). Every value is a parameter, named
    b_ and the value (not a column's name: an UPDATE reserves those)."""
    chunks, results = table_of(Chunk), table_of(Result)
    c = chunks.c
    # Its own alias: the items query also reads results, and must not correlate this one away.
    final = results.alias("final")
    unfinished_only = ~exists().where(final.c.chunk_id == c.id,
                                      final.c.pipeline_version == bindparam("b_version"),
                                      final.c.status.in_(FINAL_RESULT_STATES))
    unfinished = and_(c.job_id == bindparam("b_job_id"), c.batch_seq == bindparam("b_seq"),
                      unfinished_only)
    owner: Any = bindparam("b_owner")
    free = or_(c.lease_owner.is_(None), c.lease_owner == owner,
               c.lease_owner.in_(bindparam("b_dead", expanding=True)),
               and_(bindparam("b_expiry_counts", type_=Boolean),
                    c.lease_expires_at < bindparam("b_t")))
    # A free lease held by another owner is a dead (or expired) delivery's: a death of each
    # chunk it had in flight. Counted in the same statement, on the rows it rewrites anyway.
    taken_over = and_(c.lease_owner.is_not(None), c.lease_owner != owner)
    deaths = {"deaths": c.deaths + case((taken_over, 1), else_=0),
              "deaths_alone": c.deaths_alone + case((and_(taken_over, c.leased_alone), 1),
                                                    else_=0)}
    take = (update(chunks).where(unfinished, free)
            .values(lease_owner=owner, lease_expires_at=bindparam("b_until"),
                    leased_alone=False, **deaths)
            .returning(c.id, c.deaths))
    take_alone = (update(chunks).where(c.id == bindparam("b_id"), unfinished_only, free)
                  .values(lease_owner=owner, lease_expires_at=bindparam("b_until"),
                          leased_alone=True, **deaths)
                  .returning(c.seq, c.deaths, c.deaths_alone))
    counts = select(func.count(), func.count().filter(c.lease_owner != owner)).where(unfinished)
    holders = (select(c.lease_owner).distinct()
               .where(unfinished, c.lease_owner.is_not(None), c.lease_owner != owner))
    # The earlier attempt, if any, read per chunk through the (chunk_id, version) key: an
    # outer join let the planner hash the whole results table for 25 chunks.
    earlier = and_(results.c.chunk_id == c.id, results.c.pipeline_version == bindparam("b_version"))
    items = (
        select(c.id, c.document_id, c.text, c.token_count,
               select(results.c.attempts).where(earlier).scalar_subquery(),
               select(results.c.not_before).where(earlier).scalar_subquery(), c.level)
        # A chunk another delivery finished while this claim waited on its row lock passed
        # the claim's older snapshot of results; this statement's newer one leaves it out.
        .where(c.id.in_(bindparam("b_ids", expanding=True)), unfinished_only)
        .order_by(c.document_id, c.seq)
    )
    return _ClaimStatements(take, counts, holders, items, take_alone)


def claim(
    session: Session,
    info: BatchInfo,
    owner: str,
    lease_s: float,
    *,
    dead: Collection[str] = (),
    expiry_counts: bool = True,
) -> Claim:
    """Lease every unfinished chunk of the batch that no live delivery holds; hand the
    suspects back (`Claim.suspects`, for `lease_alone`).

    A lease is free when nobody holds it, its owner is among `dead` (its heartbeat is gone), or,
    with `expiry_counts` (the owners' liveness cannot be read), it has expired.
    """
    plan_for_now(session)
    sql = _claim_statements()
    t = now()
    batch = {"b_job_id": info.job_id, "b_seq": info.seq, "b_version": info.pipeline_version,
             "b_owner": owner}
    taken = session.execute(sql.take, batch | _free(dead, expiry_counts, t, lease_s)).all()
    claimed_ids = [r[0] for r in taken if r[1] < SUSPECT_DEATHS]
    suspects = sorted(r[0] for r in taken if r[1] >= SUSPECT_DEATHS)
    release(session, suspects, owner)
    counts = session.execute(sql.counts, batch).one()
    holders: frozenset[str] = frozenset()
    if counts[1]:
        holders = frozenset(session.scalars(sql.holders, batch))
    items: list[WorkItem] = []
    if claimed_ids:
        rows = session.execute(sql.items, {"b_version": info.pipeline_version,
                                           "b_ids": list(claimed_ids)})
        items = [WorkItem(r[0], r[1], r[2], r[3], r[4] or 0, as_utc(r[5]), r[6]) for r in rows]
    return Claim(items=items, unfinished=int(counts[0]), held_elsewhere=int(counts[1]),
                 holders=holders, suspects=tuple(suspects))


def _free(dead: Collection[str], expiry_counts: bool, t: datetime,
          lease_s: float) -> dict[str, Any]:
    """The parameters of a take: whose leases are free, and the new lease's end."""
    return {"b_dead": list(dead), "b_expiry_counts": expiry_counts, "b_t": t,
            "b_until": t + timedelta(seconds=lease_s)}


def lease_alone(
    session: Session,
    info: BatchInfo,
    owner: str,
    chunk_id: int,
    lease_s: float,
    *,
    dead: Collection[str] = (),
    expiry_counts: bool = True,
) -> Suspect | None:
    """Lease one suspect chunk alone (a death from now on implicates it and nothing else);
    None if it is final or a live delivery holds it."""
    sql = _claim_statements()
    row = session.execute(sql.take_alone, {
        "b_id": chunk_id, "b_version": info.pipeline_version, "b_owner": owner,
    } | _free(dead, expiry_counts, now(), lease_s)).one_or_none()
    if row is None:
        return None
    r = session.execute(sql.items, {"b_version": info.pipeline_version,
                                    "b_ids": [chunk_id]}).one()
    item = WorkItem(r[0], r[1], r[2], r[3], r[4] or 0, as_utc(r[5]), r[6])
    return Suspect(item, seq=row[0], deaths=row[1], deaths_alone=row[2])


def release(session: Session, chunk_ids: Sequence[int], owner: str) -> None:
    """Give up our leases on chunks we are not working on any more."""
    if chunk_ids:
        session.execute(
            update(Chunk)
            .where(Chunk.id.in_(chunk_ids), Chunk.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )


class ResultRow(TypedDict):
    """One chunk's result as the workers write it (the `results` table's row, less its keys)."""

    chunk_id: int
    job_id: int
    document_id: int
    status: NotRequired[str]  # a ResultStatus; set by whoever decides the outcome
    output: Any
    error_type: str | None
    error_message: str | None
    http_status: int | None
    finish_reason: str | None
    tokens_in: int
    tokens_in_cached: int  # of tokens_in: read from the provider's prompt cache
    tokens_out: int
    cost: float | None
    latency_ms: float | None
    attempts: int
    cached: bool
    not_before: datetime | None


def blank_result(chunk_id: int, job_id: int, document_id: int, attempts: int) -> ResultRow:
    """A result row with nothing recorded yet; callers set its status and what they know."""
    return {
        "chunk_id": chunk_id, "job_id": job_id, "document_id": document_id, "output": None,
        "error_type": None, "error_message": None, "http_status": None, "finish_reason": None,
        "tokens_in": 0, "tokens_in_cached": 0, "tokens_out": 0, "cost": None,
        "latency_ms": None, "attempts": attempts, "cached": False, "not_before": None,
    }


def record(
    session: Session, version: str, rows: Sequence[ResultRow], *, owner: str | None = None
) -> list[ResultRow]:
    """Upsert result rows; a final row already stored is never overwritten.

    With `owner` (a delivery's writes), only the rows of chunks whose lease `owner` still holds
    are written, and the others are returned: the fence against a delivery that lost its
    leases while it was frozen. The check holds the store's lock on those chunks until the
    write commits, so no claim can take a lease between the two.
    """
    if not rows:
        return []
    dropped: list[ResultRow] = []
    if owner is not None:
        held = _held(session, sorted({r["chunk_id"] for r in rows}), owner)
        dropped = [r for r in rows if r["chunk_id"] not in held]
        rows = [r for r in rows if r["chunk_id"] in held]
    if rows:
        stamped = [{**r, "pipeline_version": version, "updated_at": now()} for r in rows]
        session.execute(_record_statement(session.get_bind().dialect.name), stamped)
    return dropped


def _held(session: Session, chunk_ids: list[int], owner: str) -> set[int]:
    """Which of the chunks `owner` leases, locked against claims until the transaction ends."""
    if session.get_bind().dialect.name == "sqlite":
        mine = and_(Chunk.id.in_(chunk_ids), Chunk.lease_owner == owner)
        # pysqlite opens the transaction at the first write, so a SELECT would run outside it;
        # a write that changes nothing takes the database's one write lock here instead.
        return set(session.scalars(
            update(Chunk).where(mine).values(lease_owner=Chunk.lease_owner).returning(Chunk.id)
        ))
    # Row locks in id order (two deliveries never hold each other's chunks, but a closer may).
    return set(session.scalars(_held_statement(), {"ids": chunk_ids, "owner": owner}))


@functools.cache
def _held_statement() -> Any:
    """`_held`'s locking read, built once (it runs with every flush of results)."""
    c = Chunk.__table__.c
    return (select(c.id).where(c.id.in_(bindparam("ids", expanding=True)),
                               c.lease_owner == bindparam("owner"))
            .order_by(c.id).with_for_update())


@functools.cache
def _record_statement(dialect: str) -> Any:
    """`record`'s upsert, built once per dialect.

    Building it anew for each flush (`excluded` and its column proxies, a fresh cache key)
    doubled the client time of a 25-row flush (benchmarks/bench_store.py); the statement is
    immutable, so one serves every flush.
    """
    table = table_of(Result)
    return upsert_statement(dialect, table, ("chunk_id", "pipeline_version"), RESULT_COLUMNS,
                            where=table.c.status == ResultStatus.RETRY)


def finalize_unfinished(session: Session, info: BatchInfo, status: str, message: str) -> int:
    """Give every unfinished chunk of the batch a final row (a cancelled job)."""
    rows = session.execute(
        select(Chunk.id, Chunk.document_id, Result.attempts)
        .outerjoin(
            Result,
            and_(Result.chunk_id == Chunk.id, Result.pipeline_version == info.pipeline_version),
        )
        .where(
            Chunk.job_id == info.job_id,
            Chunk.batch_seq == info.seq,
            ~_is_final(info.pipeline_version),
        )
    ).all()
    record(
        session,
        info.pipeline_version,
        [
            blank_result(cid, info.job_id, did, attempts or 0)
            | {"status": status, "error_message": message}
            for cid, did, attempts in rows
        ],
    )
    return len(rows)


def job_spend(session: Session, job_id: int) -> tuple[int, float]:
    """Tokens and cost the job's results have recorded so far."""
    tokens, cost = session.execute(
        select(func.coalesce(func.sum(Result.tokens_in + Result.tokens_out), 0),
               func.coalesce(func.sum(Result.cost), 0.0))
        .where(Result.job_id == job_id)
    ).one()
    return int(tokens), float(cost or 0.0)
