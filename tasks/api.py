"""The Python API: `submit(...)` a corpus and get a handle to watch and read the job."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from docqueue.models import FINAL_JOB_STATES, Job, JobStatus, Lane, store_id
from docqueue.tasks.celery import state_redis
from docqueue.tasks.failures import explain, service_errors
from docqueue.tasks.publish import check_services, forget_chord_results, publish_segment
from docqueue.tasks.records import (
    ChunkResult,
    DocumentResult,
    JobInfo,
    chunk_results,
    document_results,
    job_status,
    running_jobs,
    store_outage,
)
from docqueue.tasks.runtime import runtime
from docqueue.tasks.supervisor import default_layout
from docqueue.workers import keys
from docqueue.workers.batch.cache import POLICIES as CACHE_POLICIES
from docqueue.workers.batch.liveness import batch_slots
from docqueue.workers.batch.trouble import Trouble
from docqueue.workers.clock import monotonic_s
from docqueue.workers.errors import (
    BrokerUnavailableError,
    InputError,
    JobNotPublishedError,
    NothingToSubmitError,
    ServiceUnavailableError,
    WorkerError,
)
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.ingest.tables import TableSpec, is_table, read_tables
from docqueue.workers.jobs.reconcile import forget_published
from docqueue.workers.jobs.submission import (
    Segment,
    SubmitReport,
    create_job,
    discard_job,
    ingest,
    mark_submitted,
    read_sources,
    resume_point,
)
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.pipelines.openai_batch import PIPELINE_NAME as OPENAI_BATCH
from docqueue.workers.pipelines.openai_batch_reading import read_openai_batch_file
from docqueue.workers.pipelines.openai_batch_results import write_openai_batch_results
from docqueue.workers.settings import Settings

# The records are defined with their queries in tasks/records.py; they are named here too, as
# the API's own return types. The package's public face is `docqueue/__init__.py`.
__all__ = [
    "ChunkResult",
    "DocumentResult",
    "JobHandle",
    "JobInfo",
    "JobStalledError",
    "chunk_results",
    "document_results",
    "job_status",
    "running_jobs",
    "submit",
    "write_openai_batch",
]

LANES = tuple(Lane)
SERVICE_TIERS = ("auto", "default", "flex")


def submit(
    sources: str | os.PathLike[str] | Iterable[Any],
    pipeline: str = "summarize",
    *,
    labels: list[str] | None = None,
    schema: dict[str, Any] | None = None,
    prompt: str | None = None,
    reduce: str | None = None,
    key: list[str] | None = None,
    name: str | None = None,
    cache: str = "use",
    budget_tokens: int | None = None,
    budget_cost: float | None = None,
    lane: str = "online",
    batch_fallback: str | None = None,
    fallback_below: int = 100,
    service_tier: str | None = None,
    text: str | None = None,
    id: str | None = None,
    metadata: list[str] | None = None,
) -> JobHandle:
    """Record the corpus as a job and queue its batches as they are recorded; returns once the
    corpus is recorded, with a handle.

    `sources` is a path, a glob, a list of them, or an iterable of `(id, text)` pairs or dicts
    with `id`, `text` and optional `metadata`. The pipeline's options: `labels` (classify),
    `schema` and `key` (extract), `prompt` and `reduce` (custom). `cache` is "use" (answer from
    the response cache where possible), "refresh" (call the model and overwrite the cache) or
    "off". A budget in tokens and/or dollars stops the job's model calls once spent; the chunks
    left end `skipped_budget`. `lane` is "online" (the workers call the model per chunk) or "batch"
    (the provider's Batch API at batch prices, sent and polled by `docq beat`: hours, not
    seconds; the budget counts enqueued work as spent). `batch_fallback="online"` sends what
    is left to the online lane once a provider batch leaves at most `fallback_below` chunks
    unfinished (failed lines, an expiry's rest) instead of waiting for another batch.
    `service_tier` ("auto", "default" or "flex") is sent with every online call; flex is
    priced at batch rates, and its "resource unavailable" 429s are waited out, not failed.

    Tables (workers/ingest/tables.py): a `pyarrow.Table`, an iterable of mappings with `text`
    given, or Parquet/CSV/TSV files (JSONL ones with `text` given) are read one row a
    document: `text` names the text column ("text"), `id` the id column ("id" where the table
    has one), `metadata` the columns kept as metadata (every other one).

    Raises:
        PipelineError: an unknown pipeline or options it cannot use.
        InputError: a bad option (cache policy, budget).
        NothingToSubmitError: every input was rejected; no job is recorded, and the error
            carries the first reasons.
        StoreUnavailableError, StoreNotMigratedError: the results store cannot be used;
            nothing is recorded.
        BrokerUnavailableError: the broker cannot be reached before anything is recorded.
        JobNotPublishedError: the job is recorded but the broker went away before all its
            batches were sent; `docq resume JOB` (or beat's reconciler) sends them once it is
            back.

    The online lane publishes while it reads (streaming submission): each commit's closed
    batches go out at once as a chord segment, the first within a fraction of a second, and
    the job is running from then on, `ingesting` until its last document is recorded. A
    producer that dies leaves the job ingesting; `docq resume JOB` reads path inputs again.
    """
    given = {"labels": labels, "schema": schema, "prompt": prompt, "reduce": reduce, "key": key}
    options = {k: v for k, v in given.items() if v is not None}
    pipe = build_pipeline(pipeline, options)
    if lane not in LANES:
        raise InputError(f"unknown lane {lane!r}: choose online or batch")
    if lane == Lane.BATCH and runtime().settings.mode != "chat":
        raise InputError("--lane batch sends chat requests: set DOCQ_LLM_MODE=chat")
    if batch_fallback not in (None, Lane.ONLINE) or (batch_fallback and lane != Lane.BATCH):
        raise InputError(f"--batch-fallback {batch_fallback!r}: the batch lane can fall back "
                         "to online only, with --lane batch")
    if service_tier is not None and (service_tier not in SERVICE_TIERS or lane != Lane.ONLINE):
        raise InputError(f"--service-tier {service_tier!r}: choose auto, default or flex, for "
                         "the online lane")
    if fallback_below < 1:
        raise InputError(f"--fallback-below must be at least 1, not {fallback_below!r}")
    if cache not in CACHE_POLICIES:
        raise InputError(f"unknown cache policy {cache!r}: choose use, refresh or off")
    for option, budget in (("budget_tokens", budget_tokens), ("budget_cost", budget_cost)):
        if budget is not None and not budget > 0:
            flag = "--" + option.replace("_", "-")
            raise InputError(f"{option} ({flag}) must be above 0, not {budget!r}")
    rt = runtime()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    with service_errors(rt.settings):
        # The broker is asked first: a dead one found only at the end would leave a job that
        # waits for it, where now nothing is recorded.
        _check_broker_first(rt.settings)
        table = _table_spec(sources, text, id, metadata)
        documents = (read_tables(sources, table, max_bytes=rt.settings.max_document_bytes)
                     if table is not None else  # a table's columns are checked here, first
                     _source_documents(sources, pipe.name, rt.settings))  # a batch file too
        with rt.sessions.begin() as session:
            job_id = create_job(session, rt.settings, pipe, name, cache_policy=cache,
                                budget_tokens=budget_tokens, budget_cost=budget_cost,
                                lane=lane,
                                fallback_below=fallback_below if batch_fallback else None,
                                service_tier=service_tier,
                                inputs=_inputs(sources, table, pipe.name)).id
            store = store_id(session)
        # The batch lane: beat's `lane.poll` sends it; nothing goes to the workers' queue.
        segments = _Segments(job_id, store) if lane == Lane.ONLINE else None
        with ProducerBeat(job_id):
            report = ingest(rt.sessions, rt.settings, job_id, documents,
                            _batch_slots(rt.settings),
                            on_commit=segments.send if segments else None,
                            submit_early=segments is not None)
        if not report.documents_accepted:
            with rt.sessions.begin() as session:
                discard_job(session, job_id)
            raise _nothing_to_submit(report)
        with rt.sessions.begin() as session:
            mark_submitted(session, job_id)  # the batch lane's; the online one is running
    if segments is not None:
        segments.check(report, rt.settings)
    forget_chord_results()
    return JobHandle(job_id, report)


class ProducerBeat:
    """While a producer records a job's documents, a heartbeat in docqueue's Redis says so
    (`keys.job_producer`: its host and pid, refreshed every BEAT_S, gone TTL_S after its last
    beat): `docq resume` refuses to record the same documents beside a live producer, and
    goes on once it is gone (killed, or its machine lost). A Redis out of reach only skips
    beats: the producer's own work does not depend on them."""

    BEAT_S = 2.0
    TTL_S = 6  # a dead producer's job can be resumed this long after its death

    def __init__(self, job_id: int) -> None:
        self.key = keys.job_producer(job_id)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="docq-producer-beat",
                                        daemon=True)

    def __enter__(self) -> ProducerBeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(redis.RedisError):
            state_redis().delete(self.key)

    def _run(self) -> None:
        while not self._stop.wait(self.BEAT_S):
            self._beat()

    def _beat(self) -> None:
        with contextlib.suppress(redis.RedisError):
            state_redis().set(self.key, self.name, ex=self.TTL_S)


def producer_alive(job_id: int) -> str | None:
    """The live producer recording the job (host:pid), or None when none beats."""
    with contextlib.suppress(redis.RedisError):
        holder = state_redis().get(keys.job_producer(job_id))
        return None if holder is None else (
            holder.decode() if isinstance(holder, bytes) else str(holder))
    return None


class _Segments:
    """Publishes each producer commit's batches as a chord segment (`publish_segment`), in the
    producer's writer thread. Once one cannot be sent (the broker gone), the rest are only
    recorded: the job's publish marker is dropped so that the reconciler or `docq resume`
    sends every batch nobody holds, and `check` raises JobNotPublishedError at the end."""

    def __init__(self, job_id: int, store: str) -> None:
        self.job_id, self.store = job_id, store
        self.sent = 0
        self.failed: BaseException | None = None

    def send(self, batches: Segment) -> None:
        if self.failed is not None:
            return
        try:
            self.sent += publish_segment(self.job_id, batches, self.store)
        except Exception as exc:
            self.failed = exc
            # Redis down too: its marker goes with it or expires with the messages.
            with contextlib.suppress(redis.RedisError):
                forget_published(state_redis(), self.job_id)

    def check(self, report: SubmitReport, settings: Settings) -> None:
        if self.failed is None:
            return
        exc = self.failed
        if not isinstance(found := explain(exc, settings), BrokerUnavailableError):
            raise exc
        raise JobNotPublishedError(_not_sent(self.job_id, report, found, settings, self.sent),
                                   job_id=self.job_id) from exc


def _inputs(sources: Iterable[Any], table: TableSpec | None, pipeline: str
            ) -> dict[str, Any] | None:
    """How `docq resume` reads the corpus again: the paths as given and the directory they were
    given in (documents are named by the path as given), the table spec; None when the inputs
    are not all paths (an iterable is read once)."""
    given = sources if isinstance(sources, list | tuple) else None
    if not given or not all(isinstance(s, (str, os.PathLike)) for s in given):
        return None
    spec = None if table is None else {"text": table.text, "id": table.id,
                                       "metadata": None if table.metadata is None
                                       else list(table.metadata)}
    return {"paths": [os.fspath(s) for s in given], "cwd": os.getcwd(), "table": spec,
            "pipeline": pipeline}


def resume_ingest(job_id: int) -> SubmitReport:
    """Finish recording a job whose producer died mid-submit: read its path inputs again, skip
    the documents it recorded, and go on recording and publishing as `submit` does.

    Raises:
        InputError: the job's inputs were an in-memory iterable, which cannot be read again,
            or the job is not ingesting.
    """
    rt = runtime()
    with service_errors(rt.settings):
        with rt.sessions() as session:
            job = session.get(Job, job_id)
            if job is None or not job.ingesting:
                raise InputError(f"job {job_id} is not ingesting: nothing to read again")
            inputs, lane, pipeline = job.inputs, job.lane, job.pipeline
        if inputs is None:
            raise InputError(f"job {job_id} stopped ingesting before the end, and its inputs "
                             "were an in-memory iterable that cannot be read again: submit "
                             "the rest of its documents as a new job")
        spec = inputs.get("table")
        table = None if spec is None else TableSpec(
            spec["text"], spec["id"], tuple(spec["metadata"]) if spec["metadata"] is not None
            else None)
        paths = inputs["paths"]
        with rt.sessions.begin() as session:
            point = resume_point(session, job_id)
            store = store_id(session)
        segments = _Segments(job_id, store) if lane == Lane.ONLINE else None
        if (holder := producer_alive(job_id)) is not None:
            raise InputError(f"job {job_id} is still being recorded by its producer ({holder}): "
                             "wait for that `docq submit` to end, or stop it, then resume")
        with (contextlib.chdir(inputs.get("cwd") or os.getcwd()),  # the ids name paths as given
              ProducerBeat(job_id)):
            documents = (read_tables(paths, table, max_bytes=rt.settings.max_document_bytes)
                         if table is not None else
                         _source_documents(paths, pipeline, rt.settings))
            report = ingest(rt.sessions, rt.settings, job_id, documents,
                            _batch_slots(rt.settings),
                            on_commit=segments.send if segments else None,
                            submit_early=segments is not None, resume=point)
        with rt.sessions.begin() as session:
            mark_submitted(session, job_id)
    if segments is not None:
        segments.check(report, rt.settings)
    forget_chord_results()
    return report


def _table_spec(sources: Any, text: str | None, id: str | None,
                metadata: list[str] | None) -> TableSpec | None:
    """How to read `sources` as tables, or None when they are not tables."""
    given = sources if isinstance(sources, list | tuple) else [sources]  # never a one-shot
    if text is None and not any(is_table(s) for s in given):
        if id is not None or metadata is not None:
            raise InputError("--id-column and --metadata-columns need a table: a .parquet, "
                             ".csv or .tsv file, or --text-column")
        return None
    return TableSpec(text or "text", id, tuple(metadata) if metadata is not None else None)


def _batch_slots(settings: Settings) -> int:
    """Batches the workers up now run at once, which sizes a job's last batches; with none up
    (workers started after the submit), what a `docq worker` of this machine would run."""
    try:
        slots = batch_slots(state_redis())
    except redis.RedisError:  # the broker was just reached: a hiccup; size for the default
        slots = 0
    if slots:
        return slots
    layout = default_layout(settings)
    return layout.processes * layout.batches


def _check_broker_first(settings: Settings) -> None:
    try:
        check_services(settings)
    except Exception as exc:
        found = explain(exc, settings)
        if found is None:
            raise
        raise type(found)(f"{found}; nothing was recorded") from exc


def _nothing_to_submit(report: SubmitReport) -> NothingToSubmitError:
    """The error for a submit whose every document was rejected: the count and first reasons."""
    count = report.documents_rejected
    if count == 0:
        message = "nothing to submit: the inputs hold no documents; no job was recorded"
    else:
        reasons = "; ".join(error.rstrip(".") for _, error in report.rejected[:3])
        more = f" (and {count - 3:,} more)" if count > 3 else ""
        inputs = "the one input was" if count == 1 else f"all {count:,} inputs were"
        message = f"nothing to submit: {inputs} rejected, so no job was recorded: {reasons}{more}"
    return NothingToSubmitError(message, rejected=list(report.rejected), count=count)


def _not_sent(job_id: int, report: SubmitReport, cause: WorkerError, settings: Settings,
              sent: int = 0) -> str:
    every_s = settings.reconcile_every_s
    some = "none of its batches was" if not sent else f"only {sent:,} of its batches were"
    return (f"job {job_id} is recorded ({report.documents_accepted:,} documents, "
            f"{report.chunks:,} chunks in {report.batches:,} batches) but {some} "
            f"sent: {cause}. Nothing is lost: once the broker is back, `docq resume "
            f"{job_id}` sends them, and a running `docq beat` does so by itself within "
            f"{every_s:g} s (DOCQ_RECONCILE_EVERY_S)")


def _source_documents(
    sources: Iterable[Any], pipeline: str, settings: Settings
) -> Iterator[SourceDocument]:
    """The documents to ingest. An OpenAI Batch file is checked whole here, before a job exists.

    Raises:
        InputError: the openai-batch pipeline was given other than one file.
        OpenAIBatchFileError: the batch file is missing, empty or over OpenAI's limits.
    """
    if pipeline != OPENAI_BATCH:
        return read_sources(sources, settings)
    given = list(sources)
    if len(given) != 1 or not isinstance(given[0], (str, os.PathLike)):
        what = f"{len(given)} inputs" if len(given) != 1 else f"a {type(given[0]).__name__}"
        raise InputError(
            f"the {OPENAI_BATCH} pipeline reads one OpenAI Batch file (JSONL), got {what}"
        )
    return read_openai_batch_file(given[0], max_bytes=settings.max_document_bytes)


def write_openai_batch(
    job_id: int, output_path: str | os.PathLike[str], error_path: str | os.PathLike[str]
) -> tuple[int, int]:
    """Write a finished openai-batch job's output and error files in OpenAI's format.

    Returns (successful requests written, failed requests written).
    """
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        return write_openai_batch_results(session, job_id, output_path, error_path)


class JobStalledError(WorkerError):
    """A waited-for job made no progress for longer than the caller allowed."""


@dataclass
class JobHandle:
    """A submitted job: its id, its live status, and its results once merged."""

    id: int
    report: SubmitReport | None = None

    def status(self) -> JobInfo:
        """The job's status now (see `JobInfo` for its fields).

        Raises:
            JobNotFoundError: no job has this id.
        """
        return job_status(self.id)

    def wait(
        self,
        timeout: float | None = None,
        poll_s: float = 0.5,
        progress: Callable[[JobInfo], None] | None = None,
        stall_s: float | None = None,
        on_outage: Callable[[Trouble], None] | None = None,
    ) -> JobInfo:
        """Block until the job is merged in a final state; returns its status.

        `on_outage`: called with a trouble line (`Trouble`) each time a poll finds the results
        store out of reach, and the wait goes on; without it, such a poll raises.

        Raises:
            TimeoutError: the job was not final within `timeout` seconds.
            JobStalledError: no chunk of the job became final for `stall_s` seconds.
            StoreUnavailableError: a poll failed, and no `on_outage` was given (or the store
                refuses the credentials, or lacks its tables).
        """
        deadline = None if timeout is None else monotonic_s() + timeout
        moved_at, last = monotonic_s(), None
        progress_now: tuple[Any, ...]
        while True:
            try:
                st = self.status()
            except ServiceUnavailableError as exc:
                if on_outage is None or (trouble := store_outage(exc)) is None:
                    raise
                on_outage(trouble)
                if deadline is not None and monotonic_s() > deadline:
                    raise TimeoutError(f"job {self.id} was not seen final within {timeout:g}s; "
                                       f"its last poll failed: {trouble['message']}") from exc
                moved_at = monotonic_s()  # not a stall of the job's: it cannot be seen
                time.sleep(poll_s)
                continue
            if progress is not None:
                progress(st)
            # A cancelled job is final once merged; the others are final when they say so.
            if st["status"] in FINAL_JOB_STATES and (st["status"] != JobStatus.CANCELLED
                                                     or st["finished_at"] is not None):
                return st
            now = monotonic_s()
            progress_now = (st["status"], st["chunks_done"], st["reduce_steps_done"])
            if progress_now != last:
                moved_at, last = now, progress_now
            elif stall_s is not None and now - moved_at > stall_s:
                raise JobStalledError(
                    f"job {self.id} has not moved for {now - moved_at:.0f} s "
                    f"({st['chunks_done']}/{st['chunks_total']} chunks done): no worker seems to "
                    "be working on it with this store and broker (see `docq workers`)")
            if deadline is not None and now > deadline:
                raise TimeoutError(f"job {self.id} is still {st['status']} after {timeout:g}s "
                                   f"({st['chunks_done']}/{st['chunks_total']} chunks done)")
            time.sleep(poll_s)

    def results(self) -> Iterator[DocumentResult]:
        """One record per document, in submission order (see `DocumentResult`)."""
        return document_results(self.id)

    def to_arrow(self, chunks: bool = False) -> Any:
        """The results as a `pyarrow.Table`: one flat row per document (or chunk), keyed by
        its id, with its metadata and output as columns (tasks/export.py)."""
        from docqueue.tasks.export import to_arrow

        return to_arrow(self.id, chunks=chunks)

    def to_pandas(self, chunks: bool = False) -> Any:
        """`to_arrow()` as a `pandas.DataFrame`, where pandas is installed."""
        from docqueue.tasks.export import to_pandas

        return to_pandas(self.id, chunks=chunks)

    def iter_results(self, poll_s: float = 0.5, timeout: float | None = None
                     ) -> Iterator[DocumentResult]:
        """Yield each document once it has its answer (or its error), while the job runs;
        return once the job is final and every document was yielded.

        Raises:
            TimeoutError: the job was not final within `timeout` seconds.
        """
        deadline = None if timeout is None else monotonic_s() + timeout
        seen: set[str] = set()  # a document's external id and source: unique in a job
        while True:
            final = self.status()["status"] in FINAL_JOB_STATES
            for record in document_results(self.id, finished_only=True):
                key = f"{record['id']}\0{record['source']}"
                if key not in seen:
                    seen.add(key)
                    yield record
            if final:
                return
            if deadline is not None and monotonic_s() > deadline:
                raise TimeoutError(f"job {self.id} is not final after {timeout:g}s")
            time.sleep(poll_s)
