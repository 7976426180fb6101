"""Engines, sessions, upserts and migrations for the results store (PostgreSQL or SQLite)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    """One engine per process; build it after fork, never at import time."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    # pre_ping: a restarted PostgreSQL costs one reconnect, not a failed batch.
    # hide_parameters: a failed statement's message must not carry document text into logs.
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True
    )


def plan_for_now(session: Session) -> None:
    """Plan this transaction's statements for their parameters and the tables as they are now.

    psycopg prepares a statement after a few runs, and PostgreSQL may then keep one generic
    plan for it, made while a job's tables were nearly empty: for the reads of a batch (its
    claim, the response cache) a scan of `results` and `response_cache` for every batch, slower
    with every row written (5-7 ms a batch at 8,000 chunks; the store's CPU per chunk 0.8 ms at
    8,000 and 2.1 ms at 20,000: benchmarks/bench_overhead.py with log_min_duration_statement).
    Writes keep their cached plans: planning every row of a bulk upsert halved its rate
    (benchmarks/bench_store.py).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))


def end_if_left_idle(session: Session, seconds: float) -> None:
    """Have PostgreSQL end this transaction if its client leaves it idle for `seconds`.

    A worker frozen mid-transaction (SIGSTOP, a paused VM, a swap storm) keeps the row locks
    it took: the batch row its delivery counted, the chunks it leased. Everyone who needs
    those rows next waits for it, the rescuer sending the frozen worker's batches again
    included, for as long as the freeze lasts. The server ends such a session after
    `seconds` (idle_in_transaction_session_timeout, for this transaction only); its locks go
    and the frozen worker finds the transaction gone, rolled back, when it runs again.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_IDLE_LIMIT, {"ms": str(max(1, round(seconds * 1000)))})


_IDLE_LIMIT = text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the one writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(make_engine(url), expire_on_commit=False)


def upsert_statement(
    dialect: str,
    table: Table,
    keys: Iterable[str],
    update: Iterable[str] | None = None,
    where: Any = None,
) -> Any:
    """Insert rows; on a conflict over `keys`, overwrite `update` columns (or do nothing).

    `where` limits which existing rows may be overwritten (refer to them through the table).
    For a dialect name ("postgresql" or "sqlite"); execute it with a list of rows. It is
    immutable: a hot path builds it once and runs it for every flush (building it anew cost as
    much client time as a small flush).
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(table)
    keys = list(keys)
    if update is None:
        return stmt.on_conflict_do_nothing(index_elements=keys)
    return stmt.on_conflict_do_update(
        index_elements=keys, set_={c: stmt.excluded[c] for c in update}, where=where
    )


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the store's schema to `revision` with Alembic."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = url
    command.upgrade(cfg, revision)


class MissingIdentityError(LookupError):
    """The store has no identity row: its first migration never ran to the end."""


def store_id(session: Session) -> str:
    """This store's identity (a uuid made by its first migration)."""
    from docqueue.models.tables import StoreIdentity

    value = session.scalar(select(StoreIdentity.id).limit(1))
    if value is None:
        raise MissingIdentityError("the results store has no identity row: run `docq db upgrade`")
    return value
