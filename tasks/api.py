"""The Python API: `submit(...)` a corpus and get a handle to watch and read the job."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from docqueue.models import FINAL_JOB_STATES, JobStatus, Lane
from docqueue.tasks.celery import state_redis
from docqueue.tasks.failures import explain, service_errors
from docqueue.tasks.publish import check_services, forget_chord_results, publish
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
from docqueue.workers.jobs.submission import (
    SubmitReport,
    create_job,
    discard_job,
    ingest,
    mark_submitted,
    read_sources,
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
    """Record the corpus as a job and queue its batches; returns at once with a handle.

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
        JobNotPublishedError: the job is recorded but the broker went away before its batches
            were sent; `docq resume JOB` (or beat's reconciler) sends them once it is back.
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
                                service_tier=service_tier).id
        report = ingest(rt.sessions, rt.settings, job_id, documents, _batch_slots(rt.settings))
        if not report.documents_accepted:
            with rt.sessions.begin() as session:
                discard_job(session, job_id)
            raise _nothing_to_submit(report)
        with rt.sessions.begin() as session:
            mark_submitted(session, job_id)
    if lane == Lane.BATCH:  # beat's `lane.poll` sends it: nothing goes to the workers' queue
        return JobHandle(job_id, report)
    try:
        publish(job_id)  # only after the commit: a worker must find every row it is sent
    except Exception as exc:
        if not isinstance(found := explain(exc, rt.settings), BrokerUnavailableError):
            raise
        raise JobNotPublishedError(_not_sent(job_id, report, found, rt.settings),
                                   job_id=job_id) from exc
    forget_chord_results()
    return JobHandle(job_id, report)


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


def _not_sent(job_id: int, report: SubmitReport, cause: WorkerError, settings: Settings) -> str:
    every_s = settings.reconcile_every_s
    return (f"job {job_id} is recorded ({report.documents_accepted:,} documents, "
            f"{report.chunks:,} chunks in {report.batches:,} batches) but none of its batches "
            f"was sent: {cause}. Nothing is lost: once the broker is back, `docq resume "
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
