"""Shared fixtures: real Redis, PostgreSQL and RabbitMQ on 127.0.0.1, isolated per test.

Locally a missing server skips the tests that need it; with CI=true it fails them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import make_sessionmaker, upgrade

pytest_plugins = ["tests.plugins.simulator"]

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DBS = 16  # Redis's default `databases`
IN_CI = os.environ.get("CI", "").lower() == "true"
# Under pytest-xdist each worker process is named gw0, gw1, ... (unset in a serial run).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _worker_index(name: str) -> int | None:
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else None


def _redis_test_db() -> int:
    """The Redis DB this test process flushes before and after each test.

    Several test runs on one machine must not flush each other's broker, nor xdist's workers
    each other's: a serial run uses DOCQ_TEST_REDIS_DB (15); xdist worker gwN uses
    DOCQ_TEST_REDIS_DB_BASE + N (base 8: gw0..gw7 on DBs 8..15). Past DB 15 is refused.
    """
    index = _worker_index(XDIST_WORKER)
    if index is None:
        return int(os.environ.get("DOCQ_TEST_REDIS_DB", "15"))
    base = int(os.environ.get("DOCQ_TEST_REDIS_DB_BASE", "8"))
    db = base + index
    if not 0 <= db < REDIS_DBS:
        raise pytest.UsageError(
            f"DOCQ_TEST_REDIS_DB_BASE={base}: xdist worker {XDIST_WORKER} would use Redis DB "
            f"{db}, and Redis has DBs 0-{REDIS_DBS - 1}; lower the base or pytest's -n")
    return db


def _pg_test_url() -> str:
    """The PostgreSQL database of this test process: DOCQ_TEST_PG_URL's (`test`) in a serial
    run, `<that name>_gwN` for xdist worker gwN (created on first use by `pg_database`)."""
    url = os.environ.get("DOCQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    if _worker_index(XDIST_WORKER) is None:
        return url
    root, _, name = url.rpartition("/")
    return f"{root}/{name}_{XDIST_WORKER}"


REDIS_TEST_DB = _redis_test_db()
PG_URL = _pg_test_url()


# A test that asks for one of these needs a server: it carries the integration marker, wherever
# it lives (`pytest -m "not integration"` runs what needs none).
SERVER_FIXTURES = frozenset({"redis_url", "redis_client", "pg_url", "pg_database", "docq_env",
                             "workers", "simulator", "rabbitmq_url"})
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI=true) when a server the test needs is not listening."""
    if _reachable(host, port):
        return
    message = f"{name} is not listening on {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A dedicated Redis DB, flushed before and after the test."""
    require_server("Redis", REDIS_HOST, REDIS_PORT)
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A RabbitMQ virtual host of the test's own (guest may use it), deleted after the test:
    parallel runs never share a queue."""
    require_server("RabbitMQ", RABBITMQ_HOST, RABBITMQ_PORT)
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not installed: cannot make a virtual host for the test"
        if IN_CI:
            pytest.fail(message + " (CI=true: a missing server is a failure)")
        pytest.skip(message)
    vhost = f"docq_t_{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}"
    return done.stdout


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _engine(url: str, **kwargs: Any) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://"), **kwargs)


@pytest.fixture(scope="session")
def pg_database() -> str:
    """PG_URL's database, created when it is missing (an xdist worker's own), and emptied of
    the schemas an earlier run that was killed left behind."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    root, _, name = PG_URL.rpartition("/")
    server = _engine(f"{root}/postgres", isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    server.dispose()
    admin = _engine(PG_URL)
    with admin.begin() as conn:
        if XDIST_WORKER:  # only a worker's own database: a serial run may share `test`
            for schema in conn.scalars(text(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%'")).all():
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
    return PG_URL


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A fresh PostgreSQL schema at the head migration, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _engine(pg_database)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{pg_database}?options={quote(f'-csearch_path={schema}')}"
    upgrade(url)
    yield url
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    url = f"sqlite:///{tmp_path}/docq.db"
    upgrade(url)
    return url


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    maker = make_sessionmaker(pg_url)
    yield maker
    bind = maker.kw["bind"]
    bind.dispose()
