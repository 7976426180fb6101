"""`docq worker` with no pool flag: one Celery worker per core, each running many batches at once.

The layout that keeps a provider busy in every regime. Each worker process runs the threads
pool: its threads only hand batches to the process's one event loop (tasks/runtime.py), where
every open batch's calls wait on one in-flight semaphore. A call that ends frees a slot that the
next waiting call, of any batch, takes at once; no batch's slowest call holds the others back.
Several processes (one per core by default) share the CPU work of building requests and parsing
answers, which the GIL would otherwise hold to one core.

The supervisor starts the processes, restarts one that dies (a crash, the OOM killer), stops
them warmly on SIGTERM or SIGINT (a second signal stops them at once), and replaces a process
whose memory passed DOCQ_WORKER_MAX_MEMORY_MB once it has finished its running batches: the
threads pool has no `worker_max_memory_per_child` of its own. A process that exits by itself
with status 0 was told to stop (`celery control shutdown`, a worker of the wrong store) and is
not restarted.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

import psutil

from docqueue.workers.clock import monotonic_s
from docqueue.workers.settings import Settings

logger = logging.getLogger("docq.worker")

POLL_S = 1.0
MEMORY_CHECK_S = 5.0
RESTART_PAUSE_S = 1.0  # before a crashed process's replacement starts
# A process that exits (with a status, not by a signal) within this long of its start, this
# many times running, cannot start (a setting it refuses, a broken install): the supervisor
# stops instead of restarting it every second for ever.
EARLY_EXIT_S, EARLY_EXITS = 15.0, 3
MIN_BATCHES = 4


@dataclass(frozen=True)
class Layout:
    processes: int
    batches: int  # open at once per process: the threads of its pool

    def describe(self) -> str:
        return (f"{self.processes} processes x {self.batches} batches at once, "
                f"threads pool")


def default_layout(settings: Settings, processes: int | None = None) -> Layout:
    """Processes: `processes` (`docq worker -c N`), else DOCQ_WORKER_CONCURRENCY, else one per
    core. Batches per process: DOCQ_WORKER_BATCHES, else enough that the in-flight cap stays
    full while half of the open batches wait for their last calls and, when batch sizes vary
    (`BatchSizes`), while every open batch is one of a job's last, smallest ones: each of those
    then runs in one round of calls, and a thread holds its batch until the last call ends."""
    processes = processes or settings.worker_concurrency or os.cpu_count() or 1
    if settings.worker_batches:
        return Layout(processes, settings.worker_batches)
    inflight = min(settings.llm_max_inflight, settings.worker_inflight * processes)
    per_process = 2 * inflight / (processes * settings.batch_max_chunks)
    if settings.batch_min_chunks < settings.batch_max_chunks:
        per_process = max(per_process, inflight / (processes * settings.batch_min_chunks))
    return Layout(processes, max(MIN_BATCHES, math.ceil(per_process)))


class Supervisor:
    """Runs `layout.processes` Celery workers and keeps them running until told to stop."""

    def __init__(self, layout: Layout, *, name: str, extra: Sequence[str],
                 max_memory_mb: float,
                 on_death: Callable[[int, str], object] | None = None) -> None:
        self.layout, self.name, self.extra = layout, name, list(extra)
        self.max_memory_mb = max_memory_mb
        # Told (pid, cause) when a process ends badly: the poison guard's error names the cause.
        self.on_death = on_death
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.retiring: list[subprocess.Popen[bytes]] = []  # over the memory limit, finishing
        self.stopping = 0  # signals received
        self.started: dict[int, float] = {}  # index -> monotonic start of its current process
        self.early_exits: dict[int, int] = {}  # index -> early exits running
        self.failed = False

    def argv(self, index: int) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "docqueue.tasks", "worker", "--pool=threads",
                f"--concurrency={self.layout.batches}", f"--hostname={self.name}{index}@%h",
                "--events", "--loglevel=INFO", "--without-gossip", *self.extra]

    def start(self, index: int) -> None:
        self.procs[index] = subprocess.Popen(self.argv(index), env=self.env(index))
        self.started[index] = monotonic_s()

    def env(self, index: int) -> dict[str, str]:
        """Each process serves its metrics on a port of its own: DOCQ_METRICS_PORT + index."""
        env = dict(os.environ)
        port = env.get("DOCQ_METRICS_PORT", "")
        if port.isdigit() and int(port) > 0:
            env["DOCQ_METRICS_PORT"] = str(int(port) + index)
        return env

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        logger.info("docq worker: %s", self.layout.describe())
        for i in range(self.layout.processes):
            self.start(i)
        last_memory_check = monotonic_s()
        while self.procs or self.retiring:
            time.sleep(POLL_S)
            self.retiring = [p for p in self.retiring if p.poll() is None]
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[i]
                if self.stopping or code == 0:
                    continue
                if self._cannot_start(i, code):
                    logger.error("worker process %s%d ended with %s within %.0f s of its start "
                                 "%d times running: stopping (its log above says why)",
                                 self.name, i, _status(code), EARLY_EXIT_S, EARLY_EXITS)
                    self.failed = True
                    self._on_signal(signal.SIGTERM, None)  # the others stop; none restarts
                    continue
                logger.warning("worker process %s%d (pid %d) ended with %s; starting another",
                               self.name, i, proc.pid, _status(code))
                self._tell_death(i, proc.pid, code)
                time.sleep(RESTART_PAUSE_S)
                self.start(i)
            if not self.stopping and monotonic_s() - last_memory_check > MEMORY_CHECK_S:
                last_memory_check = monotonic_s()
                self._replace_large()
        return 1 if self.failed else 0

    def _tell_death(self, index: int, pid: int, code: int) -> None:
        if self.on_death is None:
            return
        cause = f"worker process {self.name}{index} (pid {pid}) ended with {_status(code)}"
        try:
            self.on_death(pid, cause)
        except Exception as exc:  # a note for an error message: never stop the supervisor
            logger.warning("could not record how pid %d died: %s: %s", pid,
                           type(exc).__name__, exc)

    def _cannot_start(self, index: int, code: int) -> bool:
        """Whether the process keeps exiting by itself soon after its start. A death by a signal
        (code < 0: the OOM killer, an operator, a chunk that kills its worker, which the poison
        guard fails after DOCQ_MAX_DELIVERIES deaths) is no failure to start."""
        early = code > 0 and monotonic_s() - self.started.get(index, 0.0) < EARLY_EXIT_S
        self.early_exits[index] = self.early_exits.get(index, 0) + 1 if early else 0
        return self.early_exits[index] >= EARLY_EXITS

    def _replace_large(self) -> None:
        if self.max_memory_mb <= 0:
            return
        for i, proc in list(self.procs.items()):
            try:
                rss_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
            if rss_mb > self.max_memory_mb:
                logger.warning("worker process %s%d uses %.0f MB (DOCQ_WORKER_MAX_MEMORY_MB "
                               "%.0f): it finishes its batches and a new one takes its place",
                               self.name, i, rss_mb, self.max_memory_mb)
                proc.send_signal(signal.SIGTERM)
                self.retiring.append(proc)
                self.start(i)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping += 1
        # First signal: warm shutdown (running batches finish). Second: cold (at once).
        forward = signal.SIGTERM if self.stopping == 1 else signal.SIGQUIT
        for proc in [*self.procs.values(), *self.retiring]:
            if proc.poll() is None:
                proc.send_signal(forward)


def _status(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
