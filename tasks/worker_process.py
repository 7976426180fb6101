"""A worker child process with its log in a file: the demo, the integration tests and the
benchmarks all start their workers with it. `pool="default"` starts `docq worker` as a user
would (a process per `concurrency`, each running many batches: tasks/supervisor.py); prefork and
threads start one plain `celery -A docqueue.tasks worker` of that pool.

The environment given is laid over this process's own, so DOCQ_* settings reach the worker. It
runs in the caller's directory: `docqueue` is imported as installed, never from a folder beside
it (from a wheel, a cwd inside the package would put its `tasks` and `models` on sys.path).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from docqueue.workers.clock import monotonic_s


class WorkerStartError(RuntimeError):
    """The worker exited or was not ready in time; the message ends with its log's tail."""


class WorkerProcess:
    """Start one worker (its own session, so a stop reaches its pool children too).

    `concurrency` is the number of processes for the default layout, the pool's size otherwise.

    `events=False` leaves out task events (the benchmarks measure without their cost);
    `extra` goes to Celery as is (`--include=...`, `-Q ...`).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        name: str,
        concurrency: int = 2,
        pool: str = "prefork",
        events: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.ready_lines = concurrency if pool == "default" else 1
        if pool == "default":
            argv = [sys.executable, "-m", "docqueue.tasks.cli", "worker",
                    f"--concurrency={concurrency}", f"--name={name}", "--without-mingle", *extra]
        else:
            argv = [sys.executable, "-m", "celery", "-A", "docqueue.tasks", "worker",
                    f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
                    "--without-gossip", "--without-mingle", f"--hostname={name}@%h", *extra]
            if events:
                argv.append("--events")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = monotonic_s() + timeout_s
        while monotonic_s() < deadline:
            if self.log().count(" ready.") >= self.ready_lines:
                return
            if self.proc.poll() is not None:
                raise WorkerStartError(f"worker {self.name} exited with {self.proc.returncode}; "
                                       f"its log ({self.log_path}) ends:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise WorkerStartError(f"worker {self.name} was not ready after {timeout_s:g} s; its log "
                               f"({self.log_path}) ends:\n{self.log()[-3000:]}")

    def children(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def kill(self) -> None:
        """SIGKILL to the worker and its pool children at once (a crash, as tests need one)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP to the worker and its pool children: frozen, as by a long VM or GC pause."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the frozen worker runs on from where it stopped."""
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 30) -> None:
        """A warm shutdown (SIGTERM: running tasks finish), then a kill past `timeout_s`."""
        if self.proc.poll() is None:
            self.resume()  # a paused worker would never see the SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
