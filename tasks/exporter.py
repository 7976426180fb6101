"""/metrics for Prometheus: one HTTP endpoint per worker main process and one for beat.

A worker's pool processes record their model calls (workers/metrics.py) in prometheus_client's
multiprocess files, in a directory of the worker's own (`DOCQ_METRICS_DIR`/worker-<pid>),
made empty when the worker starts and removed when it stops: the main process serves the sum
of its own processes, and two workers on one machine never count each other's calls. The
files of a pool process that was replaced stay: its calls still count.

What describes state rather than events is read when Prometheus scrapes, by `StateCollector`:
queue depth per queue (LLEN on a Redis broker, a passive declare on RabbitMQ), the shared
limiter's use against its limits, in flight and cool-down, the chunks by state, tokens and cost
of each running job (from the store; the label is `job_id`, as Prometheus keeps `job` for the
scrape job), and the worker's
memory. Every read has a short timeout; a source that cannot be read
reports `docq_exporter_source_up{source=...} 0` instead of failing the scrape. Each exporter
reports the same shared state; dashboards take `max` over instances.

Off unless asked for: DOCQ_METRICS_PORT (workers) and DOCQ_BEAT_METRICS_PORT (beat).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
from celery.signals import beat_init, worker_init, worker_shutdown
from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from docqueue.tasks.celery import DEFAULT_QUEUE, RESCUE_QUEUE
from docqueue.tasks.runtime import runtime
from docqueue.workers.metrics import endpoint_label
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0  # each source a scrape reads; Prometheus's own timeout is 10 s
QUEUES = (DEFAULT_QUEUE, RESCUE_QUEUE)

def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each of docqueue's queues, read from the broker."""
    if not settings.broker_is_redis:
        from kombu.connection import Connection

        with Connection(settings.broker_url, connect_timeout=READ_TIMEOUT_S) as conn:  # type: ignore[no-untyped-call]  # kombu: no types
            channel = conn.default_channel
            # A queue no worker has declared yet answers NOT_FOUND: the source reads as down.
            return {q: channel.queue_declare(q, passive=True).message_count for q in QUEUES}
    import redis

    from docqueue.tasks.limits import running_redis

    url = settings.broker_url or running_redis(settings)  # the messages are the broker's
    if url is None:
        raise ConnectionError("the embedded Redis is not running")
    with redis.Redis.from_url(url, socket_timeout=READ_TIMEOUT_S,
                              socket_connect_timeout=READ_TIMEOUT_S) as client:
        return {q: int(client.llen(q)) for q in QUEUES}


_server: Any = None
_files: Path | None = None


def files_dir(settings: Settings, pid: int) -> Path:
    """Where the processes of the worker whose main process is `pid` keep their metric files."""
    base = settings.metrics_dir or settings.home / "metrics"
    return Path(base) / f"worker-{pid}"


def use_files(directory: Path) -> None:
    """Record metrics in `directory`'s files from now on, in this process and those it forks.

    Must run before any labelled value exists (workers/metrics.py creates none at import).
    """
    shutil.rmtree(directory, ignore_errors=True)  # a dead worker's, whose pid this one reuses
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # prometheus_client leaves MultiProcessValue unannotated
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class StateCollector(Collector):
    """Shared state, read at scrape time (read-only): queues, limiter, running jobs, memory."""

    def __init__(self, settings: Settings, worker_pid: int | None = None) -> None:
        self.settings, self.worker_pid = settings, worker_pid

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("docq_exporter_source_up",
                               "1 if this scrape could read the source, else 0.",
                               labels=["source"])
        for source, read in (("redis", self._queues), ("limiter", self._limiter),
                             ("store", self._jobs), ("process", self._memory)):
            if source == "process" and self.worker_pid is None:
                continue
            try:
                families = list(read())
            except Exception as exc:
                logger.warning("metrics: cannot read %s: %s: %s", source, type(exc).__name__,
                               exc)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _queues(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("docq_queue_depth", "Messages waiting in a broker queue.",
                                  labels=["queue"])
        for queue, waiting in queue_depths(self.settings).items():
            depth.add_metric([queue], waiting)
        yield depth

    def _limiter(self) -> Iterator[GaugeMetricFamily]:
        from docqueue.tasks.limits import limiter_status

        d = limiter_status(self.settings)
        if not d.get("available"):
            raise ConnectionError(d.get("reason", "unavailable"))
        scope = {"endpoint": endpoint_label(d["endpoint"]), "model": str(d["model"])}
        admitted = GaugeMetricFamily(
            "docq_limiter_admitted", "Requests or tokens the shared limiter admitted over the "
            "last period (a minute).", labels=[*scope, "dimension"])
        limit = GaugeMetricFamily(
            "docq_limiter_limit", "The limit per period (configured or learned from the "
            "provider's headers); absent while none is known.", labels=[*scope, "dimension"])
        for dimension in ("requests", "tokens"):
            admitted.add_metric([*scope.values(), dimension], d[dimension]["used"])
            if d[dimension]["limit"] is not None:
                limit.add_metric([*scope.values(), dimension], d[dimension]["limit"])
        yield admitted
        yield limit
        yield gauge("docq_limiter_inflight", "Model calls in flight, all workers.", scope,
                    d["inflight"])
        yield gauge("docq_limiter_inflight_cap", "The global in-flight cap.", scope,
                    d["max_inflight"])
        yield gauge("docq_limiter_cool_down_seconds", "Time left of a 429's pause for every "
                    "worker; 0 when none.", scope, float(d["cool_down_s"] or 0))

    def _jobs(self) -> Iterator[GaugeMetricFamily]:
        from docqueue.tasks.api import running_jobs

        chunks = GaugeMetricFamily(
            "docq_job_chunks", "Chunks of a running job by state (ok, error, ..., retrying, "
            "waiting).", labels=["job_id", "pipeline", "state"])
        total = GaugeMetricFamily("docq_job_size_chunks", "Chunks of a running job.",
                                  labels=["job_id", "pipeline"])
        tokens = GaugeMetricFamily("docq_job_tokens", "Tokens a running job has used so far.",
                                   labels=["job_id", "pipeline", "type"])
        cost = GaugeMetricFamily("docq_job_cost_usd", "What a running job has cost so far.",
                                 labels=["job_id", "pipeline"])
        for st in running_jobs():
            job, pipeline = str(st["id"]), str(st["pipeline"])
            for state, n in job_chunk_states(st).items():
                chunks.add_metric([job, pipeline, state], n)
            total.add_metric([job, pipeline], st["chunks_total"])
            tokens.add_metric([job, pipeline, "input"], st["tokens_in"])
            tokens.add_metric([job, pipeline, "output"], st["tokens_out"])
            if st["cost"] is not None:
                cost.add_metric([job, pipeline], st["cost"])
        yield from (chunks, total, tokens, cost)

    def _memory(self) -> Iterator[GaugeMetricFamily]:
        main = psutil.Process(self.worker_pid)
        pool = main.children()
        rss = GaugeMetricFamily("docq_worker_rss_bytes", "Resident memory of this worker's "
                                "main process, and of its pool processes together.",
                                labels=["role"])
        rss.add_metric(["main"], main.memory_info().rss)
        rss.add_metric(["pool"], sum(_rss(p) for p in pool))
        yield rss
        yield gauge("docq_worker_pool_rss_max_bytes", "The largest pool process's resident "
                    "memory (DOCQ_WORKER_MAX_MEMORY_MB replaces one past its limit).", {},
                    max((_rss(p) for p in pool), default=0))
        yield gauge("docq_worker_pool_processes", "Pool processes of this worker.", {},
                    len(pool))


def job_chunk_states(status: Mapping[str, Any]) -> dict[str, int]:
    """A job's chunks by state, with `retrying` and `waiting` (not final, not retrying)."""
    states = {state: int(n) for state, n in status["chunks_by_state"].items()}
    states["retrying"] = int(status.get("chunks_retrying") or 0)
    states["waiting"] = max(0, int(status["chunks_total"]) - int(status["chunks_done"])
                            - states["retrying"])
    return states


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:  # it exited since the list was taken
        return 0


def serve(registry: CollectorRegistry, port: int, address: str, what: str) -> None:
    """Serve `registry` on /metrics in a thread of this process."""
    global _server
    try:
        _server, _ = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:  # the work goes on without its metrics
        logger.error("%s: cannot serve metrics on %s:%d: %s", what, address, port, exc)
        return
    logger.info("%s: metrics on http://%s:%d/metrics", what, address, port)


@worker_init.connect
def _start_worker_exporter(**_: Any) -> None:
    """Before the pool starts: its processes must inherit the files' directory."""
    global _files
    settings = runtime().settings
    if not settings.metrics_port:
        return
    _files = files_dir(settings, os.getpid())
    use_files(_files)
    registry = CollectorRegistry()
    # prometheus_client leaves MultiProcessCollector's __init__ unannotated
    multiprocess.MultiProcessCollector(registry, path=str(_files))  # type: ignore[no-untyped-call]
    registry.register(StateCollector(settings, worker_pid=os.getpid()))
    serve(registry, settings.metrics_port, settings.metrics_address, "worker")


@worker_shutdown.connect
def _stop_worker_exporter(**_: Any) -> None:
    if _server is not None:
        _server.shutdown()
    if _files is not None:
        shutil.rmtree(_files, ignore_errors=True)


@beat_init.connect
def _start_beat_exporter(**_: Any) -> None:
    settings = runtime().settings
    if not settings.beat_metrics_port:
        return
    registry = CollectorRegistry()
    registry.register(StateCollector(settings))
    serve(registry, settings.beat_metrics_port, settings.metrics_address, "beat")
