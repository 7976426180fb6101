"""The Python API: `submit(...)` a corpus and get a handle to watch and read the job."""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Signature, Task, uuid
from kombu.entity import Queue
from sqlalchemy import func, select, update

from models import Batch, Document, Job, JobStatus, Result
from tasks.runtime import runtime
from workers.cache import POLICIES as CACHE_POLICIES
from workers.errors import InputError
from workers.openai_batch import PIPELINE_NAME as OPENAI_BATCH
from workers.openai_batch import read_batch_file, write_batch_results
from workers.pipelines import build_pipeline
from workers.settings import Settings
from workers.sources import SourceDocument
from workers.submission import (
    SubmitReport,
    batch_ids,
    create_job,
    ingest,
    mark_submitted,
    read_sources,
)

TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED,
                      JobStatus.CANCELLED})


def submit(
    sources: str | os.PathLike[str] | Iterable[Any],
    pipeline: str = "summarize",
    *,
    labels: list[str] | None = None,
    schema: dict[str, Any] | None = None,
    prompt: str | None = None,
    name: str | None = None,
    cache: str = "use",
    budget_tokens: int | None = None,
    budget_cost: float | None = None,
) -> JobHandle:
    """Record the corpus as a job and queue its batches; returns at once with a handle.

    `sources` is a path, a glob, a list of them, or an iterable of `(id, text)` pairs or dicts
    with `id`, `text` and optional `metadata`. `cache` is "use" (answer from the response cache
    where possible), "refresh" (call the model and overwrite the cache) or "off". A budget in
    tokens and/or dollars stops the job's model calls once spent; the chunks left end
    `skipped_budget`.

    Raises:
        PipelineError: an unknown pipeline or options it cannot use.
    """
    options = {k: v for k, v in
               {"labels": labels, "schema": schema, "prompt": prompt}.items() if v is not None}
    pipe = build_pipeline(pipeline, options)
    if cache not in CACHE_POLICIES:
        raise InputError(f"unknown cache policy {cache!r}: choose use, refresh or off")
    rt = runtime()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    documents = _source_documents(sources, pipe.name, rt.settings)  # checks a batch file first
    with rt.sessions.begin() as session:
        job_id = create_job(session, rt.settings, pipe, name, cache_policy=cache,
                            budget_tokens=budget_tokens, budget_cost=budget_cost).id
    report = ingest(rt.sessions, rt.settings, job_id, documents)
    with rt.sessions.begin() as session:
        mark_submitted(session, job_id)
    publish(job_id)  # only after the commit: a worker must find every row it is sent
    forget_chord_results()
    return JobHandle(job_id, report)


def _source_documents(
    sources: Iterable[Any], pipeline: str, settings: Settings
) -> Iterator[SourceDocument]:
    """The documents to ingest. An OpenAI Batch file is checked whole here, before a job exists.

    Raises:
        InputError: the openai-batch pipeline was given other than one file.
        BatchFileError: the batch file is missing, empty or over OpenAI's limits.
    """
    if pipeline != OPENAI_BATCH:
        return read_sources(sources, settings)
    given = list(sources)
    if len(given) != 1 or not isinstance(given[0], (str, os.PathLike)):
        what = f"{len(given)} inputs" if len(given) != 1 else f"a {type(given[0]).__name__}"
        raise InputError(
            f"the {OPENAI_BATCH} pipeline reads one OpenAI Batch file (JSONL), got {what}"
        )
    return read_batch_file(given[0], max_bytes=settings.max_document_bytes)


def write_openai_batch(
    job_id: int, output_path: str | os.PathLike[str], error_path: str | os.PathLike[str]
) -> tuple[int, int]:
    """Write a finished openai-batch job's output and error files in OpenAI's format.

    Returns (successful requests written, failed requests written).
    """
    with runtime().sessions() as session:
        return write_batch_results(session, job_id, output_path, error_path)


def forget_chord_results() -> None:
    """Drop any result subscriptions Celery opened in this process.

    `publish` sends its chord without result objects, so it subscribes to nothing; this stays
    for code that sends tasks through Celery's canvas here (each result object subscribes to its
    task's result key and unsubscribes when collected, possibly at exit after an embedded Redis
    is gone). Close them now instead.
    """
    from tasks.celery import app

    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer.subscribed_to.clear()
        consumer._pubsub = None


PUBLISH_PIPELINE = 1000  # Redis commands per round trip when sending a chord's header


def publish(job_id: int, *, batches: Collection[int] | None = None) -> int:
    """Queue the job's unfinished batches as one chord whose callback merges the job.

    `batches` limits it to those ids (the reconciler sending lost batches again); they are
    stamped as sent now. Once the chord is out, the job's publish marker is set in Redis.
    """
    from tasks.batches import process_batch
    from tasks.jobs import merge_job
    from tasks.maintenance import broker_redis
    from workers.reconcile import mark_published

    wanted = None if batches is None else set(batches)
    header = _Header()
    with runtime().sessions.begin() as session:
        total = session.scalar(select(Job.batches_total).where(Job.id == job_id)) or 0
        for bid, seq, n in batch_ids(session, job_id):
            if wanted is None or bid in wanted:
                header.add(bid, seq, n)
        if wanted is not None and header:
            session.execute(update(Batch).where(Batch.id.in_(list(header.ids)))
                            .values(updated_at=datetime.now(UTC)))
    body = merge_job.si(job_id).set(argsrepr=f"job={job_id}")
    if not header:  # an empty chord never runs its body
        body.apply_async()
        return 0
    _send_chord(process_batch, header, body,
                lambda seq, n: f"job={job_id} batch={seq}/{total} chunks={n}")
    mark_published(broker_redis(), job_id)
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
    task: Task, header: _Header, body: Signature, describe: Callable[[int, int], str]
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
    task's argsrepr (what Flower shows).
    """
    app = task.app
    amqp = app.amqp
    group_id = uuid()
    body.freeze(group_id=group_id)  # as chord.run: the body's task id, in the header's group
    app.backend.ensure_chords_allowed()
    app.backend.set_chord_size(group_id, len(header))
    route = amqp.router.route({}, task.name, None, None, task)  # one task: one route for all
    sent_event = app.conf.task_send_sent_event
    with app.producer_or_acquire() as producer, _pipelined(producer):
        if isinstance(route.get("queue"), Queue):  # bound once, not copied for every message
            route["queue"] = route["queue"].bind(producer.channel)
        for index, (batch_id, seq, chunks) in enumerate(header):
            message = amqp.create_task_message(
                uuid(), task.name, (batch_id,), {}, group_id=group_id, group_index=index,
                chord=body, reply_to=app.thread_oid, time_limit=task.time_limit,
                soft_time_limit=task.soft_time_limit, create_sent_event=sent_event,
                ignore_result=task.ignore_result, argsrepr=describe(seq, chunks),
            )
            amqp.send_task_message(producer, task.name, message, **route)


def _pipelined(producer: Any) -> AbstractContextManager[Any]:
    """Batch the producer's publishes where kombu can (5.7+ on Redis), else send each at once."""
    batch = getattr(producer, "batch", None)
    return batch(PUBLISH_PIPELINE) if batch is not None else nullcontext()


@dataclass
class JobHandle:
    """A submitted job: its id, its live status, and its results once merged."""

    id: int
    report: SubmitReport | None = None

    def status(self) -> dict[str, Any]:
        return job_status(self.id)

    def wait(
        self,
        timeout: float | None = None,
        poll_s: float = 0.5,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the job is merged in a final state; returns its status.

        Raises:
            TimeoutError: the job was not final within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status()
            if progress is not None:
                progress(st)
            # A cancelled job is final once merged; the others are final when they say so.
            if st["status"] in TERMINAL and (st["status"] != JobStatus.CANCELLED
                                             or st["finished_at"] is not None):
                return st
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {st['status']} after {timeout:g}s "
                                   f"({st['chunks_done']}/{st['chunks_total']} chunks done)")
            time.sleep(poll_s)

    def results(self) -> Iterator[dict[str, Any]]:
        return document_results(self.id)


def job_status(job_id: int) -> dict[str, Any]:
    """The job row plus live progress counted from the result rows."""
    with runtime().sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        counts = dict(session.execute(
            select(Result.status, func.count())
            .where(Result.job_id == job_id, Result.pipeline_version == job.pipeline_version)
            .group_by(Result.status)
        ).all())
        live = session.execute(
            select(func.coalesce(func.sum(Result.tokens_in), 0),
                   func.coalesce(func.sum(Result.tokens_out), 0), func.sum(Result.cost))
            .where(Result.job_id == job_id)
        ).one()
        retrying = counts.pop("retry", 0)
        return {
            "id": job.id, "name": job.name, "status": job.status, "reason": job.reason,
            "pipeline": job.pipeline, "model": job.model, "endpoint": job.endpoint,
            "documents_total": job.documents_total,
            "documents_rejected": job.documents_rejected,
            "chunks_total": job.chunks_total, "batches_total": job.batches_total,
            "chunks_done": sum(counts.values()), "chunks_retrying": retrying,
            "chunks_by_state": counts,
            "tokens_in": int(live[0]), "tokens_out": int(live[1]),
            "cost": float(live[2]) if live[2] is not None else None,
            "latency_p50_ms": job.latency_p50_ms, "latency_p95_ms": job.latency_p95_ms,
            "chunks_per_s": job.chunks_per_s,
            "created_at": _iso(job.created_at), "submitted_at": _iso(job.submitted_at),
            "finished_at": _iso(job.finished_at),
        }


def document_results(job_id: int) -> Iterator[dict[str, Any]]:
    """One record per document, in submission order, streamed from the store."""
    with runtime().sessions() as session:
        rows = session.scalars(
            select(Document).where(Document.job_id == job_id).order_by(Document.id)
            .execution_options(yield_per=1000)
        )
        for d in rows:
            yield {
                "id": d.external_id, "source": d.source, "status": d.status, "output": d.output,
                "error": d.error, "chunks": d.chunk_count, "tokens_in": d.tokens_in,
                "tokens_out": d.tokens_out, "cost": d.cost, "content_hash": d.content_hash,
                "metadata": d.meta,
            }


def _iso(t: Any) -> str | None:
    return t.isoformat() if t is not None else None
