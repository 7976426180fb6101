"""Sending a job's batches: chords of `batches.process` tasks whose callback is `jobs.merge`.

`publish_segment` sends the batches one producer commit closed, while the producer still reads
(streaming submission); `publish` sends a job's unfinished batches (`docq retry`, the
reconciler, the rescuer). Either runs after the rows it names are committed; the messages carry
ids only.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import redis
from celery import Signature, Task, uuid
from kombu.connection import Connection
from kombu.entity import Queue
from sqlalchemy import select, update

from docqueue.models import Batch, Job, store_id
from docqueue.tasks.batches import process_batch
from docqueue.tasks.celery import RESCUE_QUEUE, app, state_redis
from docqueue.tasks.jobs import merge_job
from docqueue.tasks.runtime import resolve_broker, resolve_redis, runtime
from docqueue.workers.clock import utc_now
from docqueue.workers.jobs.reconcile import mark_published
from docqueue.workers.jobs.submission import batch_ids
from docqueue.workers.settings import Settings

BROKER_CHECK_TIMEOUT_S = 5.0


def check_broker(settings: Settings) -> None:
    """Reach the broker, with short timeouts: a Redis answers a PING, a RabbitMQ accepts a
    connection (its credentials and virtual host included).

    Raises redis-py's or kombu's error (tasks/failures.py names it for the user).
    """
    if settings.broker_is_redis:
        _ping(resolve_broker(settings))
        return
    with Connection(resolve_broker(settings), connect_timeout=BROKER_CHECK_TIMEOUT_S) as conn:  # type: ignore[no-untyped-call]  # kombu: no types
        conn.ensure_connection(max_retries=1, timeout=BROKER_CHECK_TIMEOUT_S)


def check_redis(settings: Settings) -> None:
    """Ask docqueue's own Redis for a PONG, with short timeouts. Raises redis-py's error."""
    _ping(resolve_redis(settings))


def check_services(settings: Settings) -> None:
    """Before a job is recorded: the broker and, when it is another server, the Redis."""
    check_broker(settings)
    if not settings.broker_is_redis or settings.redis_url:
        check_redis(settings)


def _ping(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=BROKER_CHECK_TIMEOUT_S,
                                  socket_connect_timeout=BROKER_CHECK_TIMEOUT_S)
    try:
        client.ping()
    finally:
        client.close()


def forget_chord_results() -> None:
    """Drop any result subscriptions Celery opened in this process.

    `publish` sends its chord without result objects, so it subscribes to nothing; this stays
    for code that sends tasks through Celery's canvas here (each result object subscribes to its
    task's result key and unsubscribes when collected, possibly at exit after an embedded Redis
    is gone). Close them now instead.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer.subscribed_to.clear()
        consumer._pubsub = None


PUBLISH_PIPELINE = 1000  # Redis commands per round trip when sending a chord's header


def publish(job_id: int, *, batches: Collection[int] | None = None) -> int:
    """Queue the job's unfinished batches as one chord whose callback merges the job.

    `batches` limits it to those ids (the rescuer or the reconciler sending batches again);
    they are stamped as sent now and go to the rescue queue, ahead of the rest of the job. Once
    the chord is out, the job's publish marker is set in Redis.
    """
    wanted = None if batches is None else set(batches)
    header = _Header()
    with runtime().sessions.begin() as session:
        store = store_id(session)  # stamped on every message: a worker checks it is its store
        total = session.scalar(select(Job.batches_total).where(Job.id == job_id)) or 0
        for bid, seq, n in batch_ids(session, job_id):
            if wanted is None or bid in wanted:
                header.add(bid, seq, n)
        if wanted is not None and header:
            session.execute(update(Batch).where(Batch.id.in_(list(header.ids)))
                            .values(updated_at=utc_now()))
    # Batches sent again may end before the rest of the job: their callback waits for it.
    body = merge_job.si(job_id, store=store, until_final=wanted is not None).set(
        argsrepr=f"job={job_id}", kwargsrepr="{}")
    if not header:  # an empty chord never runs its body
        body.apply_async()
        return 0
    _send_chord(process_batch, header, body, {"store": store},
                lambda seq, n: f"job={job_id} batch={seq}/{total} chunks={n}",
                queue=None if wanted is None else RESCUE_QUEUE)
    mark_published(state_redis(), job_id)
    return len(header)


def publish_segment(job_id: int, batches: Iterable[tuple[int, int, int]], store: str) -> int:
    """Queue `(batch id, seq, chunks)` batches the producer just committed as one chord: a
    segment of a job that may still be ingesting. Its callback merges the job only once the job
    is ingested and no producer batch is open (`merging.merge_due`): the segment whose batches
    end last after the producer's last commit finalizes it. The producer commits the job's end
    before it sends the last segment, so that callback cannot run before."""
    header = _Header()
    for batch_id, seq, chunks in batches:
        header.add(batch_id, seq, chunks)
    if not header:
        return 0
    body = merge_job.si(job_id, store=store, segment=True).set(
        argsrepr=f"job={job_id} segment", kwargsrepr="{}")
    _send_chord(process_batch, header, body, {"store": store},
                lambda seq, n: f"job={job_id} batch={seq} chunks={n}")
    mark_published(state_redis(), job_id)
    return len(header)


class _Header:
    """The batches a chord will send, as three arrays: 24 bytes a batch, not a tuple each."""

    def __init__(self) -> None:
        self.ids, self.seqs, self.chunks = array("q"), array("q"), array("q")

    def add(self, batch_id: int, seq: int, chunks: int) -> None:
        self.ids.append(batch_id)
        self.seqs.append(seq)
        self.chunks.append(chunks)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.ids, self.seqs, self.chunks, strict=True)


def _send_chord(
    task: Task, header: _Header, body: Signature, kwargs: dict[str, Any],
    describe: Callable[[int, int], str], queue: str | None = None,
) -> None:
    """Send `task(batch_id)` for each batch of `header` as one chord whose callback is `body`.

    The messages are those of `chord(header)(body)`: each header task carries the group id,
    its index in the group and the body, and the Redis backend's counter (`<group>.s`) holds
    the size, so the last header task to finish sends the body. What Celery's canvas adds for a
    caller that waits on results is left out: a signature, a frozen copy and a result object
    per header task, all built before the first is sent and kept until the last is, and a
    subscription to every result key; and each message and each task-sent event cost a Redis
    round trip through a newly built client. For 40,000 batches that took the producer from
    206 MiB (the ingest) to a 452 MiB peak, and 46 s (benchmarks/bench_producer.py). Here each
    message is built and sent in turn, through one producer whose publishes go out
    PUBLISH_PIPELINE Redis commands a round trip; the counter is set before the first message,
    so no header task can finish before its chord exists. `describe(seq, chunks)` is the header
    task's argsrepr (what Flower shows). `queue` names another queue than the task's own.
    """
    app = task.app
    amqp = app.amqp
    group_id = uuid()
    body.freeze(group_id=group_id)  # as chord.run: the body's task id, in the header's group
    app.backend.ensure_chords_allowed()
    app.backend.set_chord_size(group_id, len(header))
    options = {} if queue is None else {"queue": queue}
    route = amqp.router.route(options, task.name, None, None, task)  # one route for all
    sent_event = app.conf.task_send_sent_event
    with app.producer_or_acquire() as producer, _pipelined(producer):
        if isinstance(route.get("queue"), Queue):  # bound once, not copied for every message
            route["queue"] = route["queue"].bind(producer.channel)
        for index, (batch_id, seq, chunks) in enumerate(header):
            message = amqp.create_task_message(
                uuid(), task.name, (batch_id,), kwargs, group_id=group_id, group_index=index,
                chord=body, reply_to=app.thread_oid, time_limit=task.time_limit,
                soft_time_limit=task.soft_time_limit, create_sent_event=sent_event,
                ignore_result=task.ignore_result, argsrepr=describe(seq, chunks), kwargsrepr="{}",
            )
            amqp.send_task_message(producer, task.name, message, **route)


def _pipelined(producer: Any) -> AbstractContextManager[Any]:
    """Batch the producer's publishes where kombu can (5.7+ on Redis), else send each at once."""
    batch = getattr(producer, "batch", None)
    return batch(PUBLISH_PIPELINE) if batch is not None else nullcontext()
