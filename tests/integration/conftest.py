"""Real worker processes against real Redis, PostgreSQL and the simulator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu.pools
import pytest

from docqueue.tasks.runtime import reset_runtime
from docqueue.tasks.worker_process import WorkerProcess


@pytest.fixture
def docq_env(
    pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., dict[str, str]]:
    """Point this process's runtime (and the workers it starts) at the test's stores.

    Call it with the simulator's URL and any DOCQ_* overrides; it returns the environment.
    """

    def configure(llm_url: str, **overrides: Any) -> dict[str, str]:
        env = {
            "DOCQ_DATABASE_URL": pg_url,
            "DOCQ_BROKER_URL": redis_url,
            "DOCQ_LLM_BASE_URL": llm_url,
            "DOCQ_LLM_MODEL": "docq-sim",
            "DOCQ_LLM_MODE": "chat",
            "DOCQ_HOME": str(tmp_path / "home"),
            "DOCQ_RETRY_BACKOFF_BASE_S": "0.2",
        }
        env.update({f"DOCQ_{k.upper()}": str(v) for k, v in overrides.items()})
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        reset_runtime()
        _follow_settings()
        return env

    yield configure
    reset_runtime()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> dict[str, str]:
    """The overrides for `docq_env` that put the test's tasks on each broker in turn: Redis
    (the test's Redis carries everything), then RabbitMQ (a virtual host of the test's own for
    the tasks, the test's Redis for docqueue's state)."""
    if request.param == "redis":
        return {}
    return {"broker_url": request.getfixturevalue("rabbitmq_url"), "redis_url": redis_url}


def _follow_settings() -> None:
    """Point this process's Celery app at the test's broker and Redis.

    The app reads them once per process: a test on another broker (or another Redis DB) would
    otherwise publish where none of its workers listen.
    """
    from docqueue.tasks.celery import _configure, app
    from docqueue.tasks.runtime import resolve_broker, resolve_redis, runtime

    settings = runtime().settings
    if not app.configured or (app.conf.broker_url, app.conf.result_backend) == (
            resolve_broker(settings), resolve_redis(settings)):
        return
    _configure(app)
    # The app's connection and producer pools live in kombu's process-wide registry, keyed by
    # broker URL: closing one there and coming back to the same URL later (Redis, RabbitMQ,
    # Redis again) would find it closed ("Acquire on closed pool"). Empty the registry instead.
    kombu.pools.reset()
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    app._backend_cache = None  # the former result backend's client
    app._local = threading.local()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers: `workers(env, concurrency=2)` is `docq worker` as users run it (two
    processes, many batches each); `pool="prefork"` or `"threads"` a plain Celery worker of that
    pool. All stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], concurrency: int = 2, pool: str = "default") -> WorkerProcess:
        name = f"w{len(started)}"
        w = WorkerProcess(env, tmp_path / f"{name}.log", name=name, concurrency=concurrency,
                          pool=pool)
        started.append(w)
        w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()
