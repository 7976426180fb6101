"""Configurations docqueue cannot run are refused at start, by every command, in one line.

The broker may be Redis or RabbitMQ; docqueue's own state is always in Redis (DOCQ_REDIS_URL,
else a Redis broker's). Nothing here reaches a server: the refusal comes before any connection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from docqueue.tasks.supervisor import EARLY_EXITS, Layout, Supervisor
from docqueue.workers.settings import Settings, settings_problem

SECRET = "s3cret-pw"
DOCQ = Path(sys.executable).parent / "docq"

# (environment, what the one line must say)
BAD = [
    ({"DOCQ_BROKER_URL": f"amqp://guest:{SECRET}@127.0.0.1:5672//"},
     "DOCQ_BROKER_URL is RabbitMQ (amqp://guest:***@127.0.0.1:5672//) and DOCQ_REDIS_URL is unset"),
    ({"DOCQ_BROKER_URL": f"sqs://key:{SECRET}@queue/"},
     "invalid setting DOCQ_BROKER_URL: unknown scheme in sqs://key:***@queue/"),
    ({"DOCQ_REDIS_URL": f"rediz://:{SECRET}@127.0.0.1:6379/0"},
     "invalid setting DOCQ_REDIS_URL: rediz://:***@127.0.0.1:6379/0 is not a Redis URL"),
    ({"DOCQ_BROKER_URL": "amqp://guest@127.0.0.1:5672//",
      "DOCQ_REDIS_URL": f"amqp://guest:{SECRET}@127.0.0.1:5672//"},
     "invalid setting DOCQ_REDIS_URL: amqp://guest:***@127.0.0.1:5672// is not a Redis URL"),
    ({"DOCQ_LLM_BASE_URL": f"https://team:{SECRET}@llm.example.com/v1"},
     "invalid setting DOCQ_LLM_BASE_URL: https://team:***@llm.example.com/v1 carries "
     "credentials (user:password@): put the API key in DOCQ_LLM_API_KEY"),
]
IDS = ["amqp-without-redis", "unknown-broker-scheme", "unknown-redis-scheme", "redis-url-amqp",
       "endpoint-with-credentials"]


def clean_env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCQ_")}
    return {**env, "DOCQ_HOME": str(tmp_path / "home"), **extra}


@pytest.mark.parametrize(("bad", "says"), BAD, ids=IDS)
def test_settings_name_the_setting_and_the_problem_with_the_password_masked(
    bad: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a bad broker or Redis setting
    monkeypatch.chdir(tmp_path)  # no .env file
    for key in [k for k in os.environ if k.startswith("DOCQ_")]:
        monkeypatch.delenv(key)
    for key, value in bad.items():
        monkeypatch.setenv(key, value)
    # When the settings are read
    with pytest.raises(ValidationError) as error:
        Settings()
    # Then the problem reads as one line naming the setting, the password masked
    line = settings_problem(error.value)
    assert says in line and "\n" not in line and SECRET not in line


@pytest.mark.parametrize("command", [["worker"], ["check"], ["status"]])
@pytest.mark.parametrize(("bad", "says"), BAD[:2], ids=IDS[:2])
def test_every_command_refuses_it_at_start_in_one_line(
    command: list[str], bad: dict[str, str], says: str, tmp_path: Path
) -> None:
    # Given a bad broker setting in the environment
    env = clean_env(tmp_path, bad)
    # When a command starts (`docq worker` would start its Celery processes)
    done = subprocess.run([str(DOCQ), *command], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    # Then it stops at once with one `error:` line and the usage exit status, no traceback
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [done.stderr.strip()] and says in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and SECRET not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_celery_started_directly_refuses_it_in_one_line(tmp_path: Path) -> None:
    # Given an amqp broker and no DOCQ_REDIS_URL
    env = clean_env(tmp_path, BAD[0][0])
    # When a Celery worker is started on docqueue's app directly, not through `docq worker`
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "docqueue.tasks", "worker"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    # Then it exits non-zero with the same one line and no traceback
    assert done.returncode != 0
    assert done.stderr.strip().startswith(f"error: invalid settings: {BAD[0][1]}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr and SECRET not in done.stderr


class _NeverStarts(Supervisor):
    def argv(self, index: int) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(1)"]


def test_a_worker_process_that_cannot_start_stops_the_supervisor_instead_of_a_restart_loop(
) -> None:
    # Given `docq worker`'s supervisor whose processes exit with status 1 as they start
    supervisor = _NeverStarts(Layout(2, 4), name="t", extra=[], max_memory_mb=0)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    try:
        # When it runs
        code = supervisor.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    # Then it gives up after a few early exits of each, with a failure status, not every second
    # for ever
    assert code == 1
    assert time.monotonic() - started < 6 * EARLY_EXITS
    assert not supervisor.procs


@pytest.mark.parametrize(
    ("env", "broker_is_redis", "state"),
    [
        ({}, True, None),  # the embedded Redis carries both
        ({"DOCQ_BROKER_URL": "redis://h:6379/3"}, True, "redis://h:6379/3"),
        ({"DOCQ_BROKER_URL": "rediss://h:6380/0", "DOCQ_REDIS_URL": "redis://r:6379/1"}, True,
         "redis://r:6379/1"),
        ({"DOCQ_BROKER_URL": "amqp://g:g@h:5672/v", "DOCQ_REDIS_URL": "unix:///run/r.sock"},
         False, "unix:///run/r.sock"),
        ({"DOCQ_REDIS_URL": "redis://r:6379/2"}, True, "redis://r:6379/2"),
    ],
)
def test_docqueues_redis_defaults_to_a_redis_broker(
    env: dict[str, str], broker_is_redis: bool, state: str | None,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given broker and Redis settings docqueue can run
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("DOCQ_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # When they are read
    settings = Settings()
    # Then the Redis is DOCQ_REDIS_URL, else a Redis broker's, else (None) the embedded one
    assert settings.broker_is_redis is broker_is_redis
    assert settings.state_redis_url == state
