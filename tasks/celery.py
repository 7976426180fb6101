"""The Celery app. Configured on first use, so importing it opens no connection."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, worker_process_init, worker_ready
from kombu.entity import Exchange, Queue
from pydantic import ValidationError

from docqueue.tasks.runtime import (
    max_memory_kib,
    reset_runtime,
    resolve_broker,
    resolve_redis,
    runtime,
)
from docqueue.workers.settings import settings_problem

app = Celery("docqueue", include=["docqueue.tasks.batches", "docqueue.tasks.jobs",
                                   "docqueue.tasks.beat", "docqueue.tasks.lane"])

# Batches sent again (a dead delivery's, a lost message's) go to a queue of their own that every
# worker also consumes: they do not wait behind the rest of a deep queue. Kombu polls a worker's
# queues in turn, so a waiting rescue is taken within a poll or two of a free slot.
DEFAULT_QUEUE, RESCUE_QUEUE = "celery", "docq.rescue"


def state_redis() -> Any:
    """This process's client of docqueue's own Redis (DOCQ_REDIS_URL, or a Redis broker's): the
    result backend, whose client the limiter, leases and heartbeats share."""
    return app.backend.client


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    try:
        s = runtime().settings
    except ValidationError as exc:
        # `celery -A docqueue.tasks ...` started directly: one line, not a traceback.
        raise SystemExit(f"error: {settings_problem(exc)}") from None
    backend = resolve_redis(s)
    # On a Redis broker the visibility timeout must be set in all three places Celery reads it.
    # RabbitMQ has none: a dead consumer's unacknowledged messages come back as its connection
    # closes, and the server's own consumer_timeout (30 min by default) bounds how long one
    # may stay unacknowledged; it must exceed DOCQ_TASK_TIME_LIMIT_S and DOCQ_RETRY_BACKOFF_MAX_S.
    transport = {"visibility_timeout": s.visibility_timeout_s}
    sender.conf.update(
        broker_url=resolve_broker(s),
        result_backend=backend,  # Redis: the native chord counter, never chord_unlock polling
        broker_transport_options=transport if s.broker_is_redis else {},
        result_backend_transport_options=transport,
        visibility_timeout=s.visibility_timeout_s,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        # a killed child's batch is redelivered (the poison guard is per chunk)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=s.task_time_limit_s,
        task_soft_time_limit=s.task_soft_time_limit_s,
        result_expires=7 * 24 * 3600,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        # A pool process past DOCQ_WORKER_MAX_MEMORY_MB finishes its batch and is replaced.
        worker_max_memory_per_child=max_memory_kib(s),
        # Cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT): running batches get
        # this long, then are cut and their messages go back to the queue at once, not after
        # the visibility timeout. A plain SIGTERM (warm) lets them finish, within their time limit.
        worker_soft_shutdown_timeout=s.worker_soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=True,  # retries waiting out a countdown go back too
        # reconcile, memory reports, /metrics; the retention purge
        imports=("docqueue.tasks.maintenance", "docqueue.tasks.exporter",
                 "docqueue.tasks.lifecycle"),
        task_default_queue=DEFAULT_QUEUE,
        task_queues=_queues(),
    )


def _queues() -> tuple[Queue, Queue]:
    return _queue(DEFAULT_QUEUE), _queue(RESCUE_QUEUE)


def _queue(name: str) -> Queue:
    # Bound to its own direct exchange by its own name (a bare Queue would be bound to the
    # default exchange with the default routing key: its messages would land in `celery`).
    # kombu's Queue and Exchange have no annotations.
    return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


@after_setup_logger.connect
def _quiet_http_logs(**_: Any) -> None:
    # One INFO line per model call drowns the task lines in a worker's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@worker_process_init.connect
def _fresh_runtime(**_: Any) -> None:
    # Pool children must not share the parent's connections.
    reset_runtime()
    # Not the connections ahead: a prefork child must report up within Celery's
    # worker_proc_alive_timeout (4 s by default); its start is kept as short as before.
    _warm_up(open_ahead=False)


@worker_ready.connect
def _warm_up_threads(sender: Any, **_: Any) -> None:
    # A threads-pool worker runs its batches in this process: no pool child warms up for it.
    pool_cls = getattr(getattr(sender, "controller", None), "pool_cls", None)
    if pool_cls is not None and "thread" in getattr(pool_cls, "__module__", ""):
        _warm_up()


def _warm_up(*, open_ahead: bool = True) -> None:
    """Load the tokenizer and build the clients now, not on the first batch: the first result
    of a job should not wait for them (with `open_ahead`, nor for the first connections). A
    failure here only defers it to the first task."""
    from docqueue.workers.tokens import count_tokens

    count_tokens("warm up")
    try:
        if open_ahead:
            runtime().open_ahead()
        else:
            runtime().services()
    # The first task reports the same problem, with its batch id.
    except Exception as exc:
        logging.getLogger(__name__).warning("worker start: %s: %s", type(exc).__name__, exc)
