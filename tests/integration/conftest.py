"""Real worker processes against real Redis, PostgreSQL and the simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.runtime import reset_runtime

ROOT = Path(__file__).resolve().parents[2]


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
        from tasks.celery import app

        # The app reads its broker once per process: a test on another Redis DB would publish
        # where none of its workers listen.
        if app.configured and app.conf.broker_url != redis_url:
            pytest.fail(f"this process already publishes to {app.conf.broker_url}, not {redis_url}")
        return env

    yield configure
    reset_runtime()


class WorkerProcess:
    """A `celery -A tasks worker` subprocess; its log is kept for assertions and failures."""

    def __init__(self, env: dict[str, str], log: Path, concurrency: int, name: str,
                 pool: str = "prefork") -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", f"--pool={pool}",
             f"--concurrency={concurrency}", "--loglevel=INFO", "--without-gossip",
             "--without-mingle", "--events", f"--hostname={name}@%h"],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout_s}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes: `workers(env, concurrency=2, pool="prefork")`; all stopped at
    teardown."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str], concurrency: int = 2, pool: str = "prefork") -> WorkerProcess:
        name = f"w{len(started)}"
        w = WorkerProcess(env, tmp_path / f"{name}.log", concurrency, name, pool)
        started.append(w)
        w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()
