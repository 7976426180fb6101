"""`docq demo` as a new user runs it: from a directory of their own, on the embedded defaults.

Each test runs the real command in a fresh temporary directory (its own SQLite store, its own
embedded Redis and local model server under `.docq/`), reads what it prints as it prints it,
and checks the exit status and the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration.test_localmodel import require_local_extra

pytestmark = [pytest.mark.integration, pytest.mark.local_model]


class Demo:
    """`docq demo` in `cwd`, its output lines queued with the time each arrived."""

    def __init__(self, cwd: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCQ_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from docqueue.tasks.cli import main; main()", "demo", *args],
            cwd=cwd, env={**env, "COLUMNS": "200"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put((time.monotonic(), line.rstrip("\n")))

    def until(self, fragment: str, timeout_s: float) -> float:
        """Wait for a line containing `fragment`; the time it arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                at, line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if fragment in line:
                return at
        raise AssertionError(f"no line with {fragment!r}; output so far:\n" + "\n".join(self.seen))

    def finish(self, timeout_s: float) -> tuple[int, str]:
        code = self.proc.wait(timeout_s)
        self._reader.join(10)  # the output to its end, and the pipe closed
        while not self.lines.empty():
            self.seen.append(self.lines.get()[1])
        return code, "\n".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._reader.join(10)


@pytest.fixture
def user_dir(tmp_path: Path) -> Iterator[Path]:
    require_local_extra()
    where = tmp_path / "somewhere-else"
    where.mkdir()
    yield where
    # Stop anything a failed demo left behind in this home.
    for name in ("llm", "redis"):
        state = where / ".docq" / name / "server.json"
        if state.exists():
            with contextlib.suppress(OSError, ValueError, KeyError):
                os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)


def chunk_states(store: Path) -> dict[str, int]:
    engine = create_engine(f"sqlite:///{store}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM results GROUP BY status")).all()
    engine.dispose()
    return dict(rows)


def test_the_demo_runs_from_any_directory_and_survives_its_model_server_being_killed(
    user_dir: Path,
) -> None:
    # Given a new user in a directory that is not the project's, running the demo
    demo = Demo(user_dir)
    try:
        demo.until("local model at", 180)
        demo.until("/12 chunks", 300)
        # When the local model server is killed mid-job
        state = json.loads((user_dir / ".docq" / "llm" / "server.json").read_text())
        killed_at = time.monotonic()
        os.kill(state["pid"], signal.SIGKILL)
        # Then the demo names the crash, with the server's log, within 5 s
        named_at = demo.until("was killed by signal SIGKILL", 30)
        assert named_at - killed_at < 5.0
        assert any(str(user_dir / ".docq" / "llm" / "server.log") in line for line in demo.seen)
        # it restarts the server once, and the job still succeeds with no chunk failed
        demo.until("the local model is back", 120)
        code, output = demo.finish(900)
    finally:
        demo.kill()
    print(output)  # shown with -s: what the user saw
    assert code == 0, output
    assert "job 1: succeeded" in output
    store = user_dir / "docq.db"
    assert store.exists(), "the store is in the user's directory, not the project's"
    assert chunk_states(store) == {"ok": 12}
    # And a second run there answers from the store at once
    again = Demo(user_dir)
    try:
        code, output = again.finish(120)
    finally:
        again.kill()
    assert code == 0, output
    assert "already holds this corpus's results" in output
    assert "job 1: succeeded" in output
