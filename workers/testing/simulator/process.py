"""Run the simulator as a child process on a free loopback port (for tests and benchmarks)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import IO, Any, Self

_LISTENING = re.compile(r"listening on http://([^:/\s]+):(\d+)/v1")


class SimulatorStartError(RuntimeError):
    """The simulator exited or did not answer in time; the message carries its stderr."""


class SimulatorProcess:
    """`python -m docqueue.workers.testing.simulator ARGS` on 127.0.0.1, port 0 unless ARGS
    give --port.

    Use as a context manager, or call start() and stop(). `url` is the base_url for an OpenAI
    client (http://127.0.0.1:PORT/v1).
    """

    def __init__(self, *args: str, startup_timeout_s: float = 20.0) -> None:
        self.args = list(args)
        self.startup_timeout_s = startup_timeout_s
        self.host = "127.0.0.1"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._final_output = ""

    def __repr__(self) -> str:  # the args may hold an API key: leave them out
        state = "running" if self.running else "stopped"
        return f"SimulatorProcess({self.host}:{self.port}, {state})"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the simulator has not been started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait until it answers. Raises SimulatorStartError."""
        if self._proc is not None:
            raise RuntimeError("the simulator was already started")
        argv = [sys.executable, "-m", "docqueue.workers.testing.simulator"]
        if "--host" not in self.args:
            argv += ["--host", self.host]
        if "--port" not in self.args:
            argv += ["--port", "0"]
        # Kept open for the child's whole life (and closed in stop()), not a `with` block.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            argv + self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=dict(os.environ),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise SimulatorStartError(
                    f"the simulator exited with code {self._proc.returncode}: {self.output()}"
                )
            if not self.port:
                found = _LISTENING.search(self.output())
                if found:
                    self.host, self.port = found.group(1), int(found.group(2))
            if self.port and self._answers():
                return
            time.sleep(0.05)
        raise SimulatorStartError(
            f"the simulator did not answer within {self.startup_timeout_s:g}s: {self.output()}"
        )

    def _answers(self) -> bool:
        """Any HTTP answer from GET /v1/models (a 401 too) means the server is up."""
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                return True
        except urllib.error.HTTPError as answer:
            answer.close()
            return True
        except OSError:
            return False

    def output(self) -> str:
        """What the server has written to stdout and stderr so far."""
        if self._log is None:
            return self._final_output
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace").strip()

    def stats(self) -> dict[str, Any]:
        """GET /stats."""
        return self._json("GET", "/stats")

    def requests(self) -> list[dict[str, Any]]:
        """GET /requests (the simulator must run with --record-requests): one record per
        completion request, in the order they ended: start, end (epoch s), status, prompt."""
        records: list[dict[str, Any]] = self._json("GET", "/requests")["requests"]
        return records

    def reset_stats(self) -> None:
        """POST /stats/reset."""
        self._json("POST", "/stats/reset")

    def _json(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.root_url}{path}", method=method, data=None)
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate (SIGTERM), wait, and kill if it is still there after `timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._final_output = self.output()
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
