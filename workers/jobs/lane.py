"""The batch lane: a job's chunks through the provider's Batch API, with a ledger in the store.

One `advance(job)` (run by beat, every DOCQ_BATCH_POLL_S, and by `docq resume`) moves a
batch-lane job on as far as it can without waiting:

1. finish what a crash left half done: a ledger row still `uploading` is uploaded (again), one
   `uploaded` is looked for at the provider by its metadata (`docq_ledger`) and created only
   if it is not there;
2. a cancelled job's live provider batches are cancelled at the provider;
3. every `created` provider batch is polled; a terminal one has its output and error files
   read and recorded as result rows, closed and its chunks unlinked in one transaction;
4. a running job's unfinished chunks that no live provider batch holds are answered from the
   response cache where possible, and the rest are cut into files within the provider's limits
   (requests, bytes, enqueued tokens) and the job's budget, and sent.

Every step that calls the provider is preceded by a commit that says what is about to be done,
so a crash anywhere is finished by the next `advance` without losing a line or sending a chunk
twice: the partial unique index on live chunk links keeps a chunk in one live provider batch.
A job whose every chunk has a final result and no live provider batch is `ready` to merge; the
caller sends the same `jobs.merge` as the online lane's chord.

Failed lines (a 5xx or 429 from the provider, or output that does not parse) get a `retry` row
and go in a later batch, up to DOCQ_MAX_ATTEMPTS; an expired or cancelled batch's lines that
never ran get no row at all, so those chunks are simply sent again (or, for a cancelled job,
recorded `cancelled`). A batch the provider fails whole (validation, its enqueued-token limit)
is an attempt for each of its chunks, so one that keeps failing ends in error rows. Cost is the
token usage at the batch price (settings.Price.rates).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import and_, exists, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import (
    FINAL_RESULT_STATES,
    Chunk,
    Job,
    JobStatus,
    Lane,
    LedgerState,
    ProviderBatch,
    ProviderBatchChunk,
    Result,
    ResultStatus,
)
from docqueue.workers.batch import cache, leases
from docqueue.workers.batch.cache import CachePolicy
from docqueue.workers.batch.leases import ResultRow
from docqueue.workers.batch.processing import CANCELLED_MESSAGE, prompt_tokens
from docqueue.workers.errors import PermanentError, RetryableError
from docqueue.workers.pipelines import Pipeline, Prompt, build_pipeline
from docqueue.workers.provider.batch_api import LEDGER_KEY, TERMINAL, BatchApi, RequestBodies, line
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

CUSTOM_ID_PREFIX = "chunk-"
READ_CHUNKS = 2_000  # chunks per query when building files
RETRYABLE_LINE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class JobView:
    id: int
    status: str
    pipeline: str
    version: str
    options: dict[str, Any]
    cache_policy: str
    budget_tokens: int | None
    budget_cost: float | None
    fallback_below: int | None


@dataclass
class Advance:
    """What one `advance` did, for logs and `docq resume`."""

    job_id: int
    sent: int = 0  # provider batches created
    polled: int = 0
    closed: int = 0
    recorded: int = 0  # result rows written from provider files
    cached: int = 0
    ready: bool = False  # every chunk final and nothing live: merge the job
    online: bool = False  # the job moved to the online lane: publish its batches

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Request:
    chunk_id: int
    document_id: int
    attempts: int
    key: str
    line: bytes
    tokens: int  # prompt tokens: what the provider's enqueued-token limit counts
    max_tokens: int


@dataclass
class _Context:
    sessions: sessionmaker[Session]
    settings: Settings
    api: BatchApi
    bodies: RequestBodies
    endpoint: str
    job: JobView
    pipeline: Pipeline
    done: Advance = field(init=False)

    def __post_init__(self) -> None:
        self.done = Advance(self.job.id)


def lane_jobs(session: Session) -> list[int]:
    """Batch-lane jobs that may need work: running, or cancelled and not merged yet."""
    return list(session.scalars(
        select(Job.id).where(
            Job.lane == Lane.BATCH,
            (Job.status == JobStatus.RUNNING)
            | ((Job.status == JobStatus.CANCELLED) & Job.finished_at.is_(None)),
        ).order_by(Job.id)
    ))


def advance(sessions: sessionmaker[Session], settings: Settings, api: BatchApi,
            bodies: RequestBodies, endpoint: str, job_id: int) -> Advance:
    """Move one batch-lane job on as far as it goes without waiting (the module docstring)."""
    with sessions.begin() as session:
        job = _job_view(session, job_id)
    if job is None:
        return Advance(job_id)
    ctx = _Context(sessions, settings, api, bodies, endpoint, job,
                   build_pipeline(job.pipeline, job.options))
    cancelled = job.status == JobStatus.CANCELLED
    for row in _rows(ctx, (LedgerState.UPLOADING, LedgerState.UPLOADED)):
        _finish_sending(ctx, row, cancelled=cancelled)
    if cancelled:
        _cancel_live(ctx)
    for row in _rows(ctx, (LedgerState.CREATED,)):
        _poll(ctx, row)
    if not cancelled and _fall_back(ctx):
        ctx.done.online = True
        return ctx.done
    if not cancelled:
        _send_new(ctx)
    with sessions.begin() as session:
        if cancelled and not _live_links(session, job_id):
            _finalize_cancelled(session, job)
        ctx.done.ready = not _live_links(session, job_id) and _unfinished(session, job) == 0
    return ctx.done


def _job_view(session: Session, job_id: int) -> JobView | None:
    job = session.get(Job, job_id)
    if job is None or job.lane != Lane.BATCH:
        return None
    return JobView(job.id, job.status, job.pipeline, job.pipeline_version, dict(job.options),
                   job.cache_policy, job.budget_tokens, job.budget_cost, job.fallback_below)


def _rows(ctx: _Context, states: Sequence[str]) -> list[ProviderBatch]:
    with ctx.sessions.begin() as session:
        rows = list(session.scalars(
            select(ProviderBatch)
            .where(ProviderBatch.job_id == ctx.job.id, ProviderBatch.state.in_(list(states)))
            .order_by(ProviderBatch.id)
        ))
        session.expunge_all()
    return rows


def _update(ctx: _Context, row_id: int, **values: Any) -> None:
    with ctx.sessions.begin() as session:
        session.execute(update(ProviderBatch).where(ProviderBatch.id == row_id).values(**values))


def _fall_back(ctx: _Context) -> bool:
    """Move the job to the online lane when what a provider batch left is few enough.

    Only with nothing live at the provider, so no chunk can be in a provider batch and an
    online delivery at once; the reconciler and the chord own the job from here.
    """
    threshold = ctx.job.fallback_below
    if threshold is None:
        return False
    with ctx.sessions.begin() as session:
        states = set(session.scalars(select(ProviderBatch.state).distinct()
                                     .where(ProviderBatch.job_id == ctx.job.id)))
        if states != {LedgerState.CLOSED}:
            return False  # nothing sent yet, or something still live
        left = _unfinished(session, ctx.job)
        if not 0 < left <= threshold:
            return False
        session.execute(update(Job).where(Job.id == ctx.job.id).values(lane=Lane.ONLINE))
    logger.info("job %s: %d chunks left after its provider batches go online", ctx.job.id, left)
    return True


# -- sending --------------------------------------------------------------------------------------


def _send_new(ctx: _Context) -> None:
    """Cut the job's free unfinished chunks into files within every limit, and send them."""
    cfg = ctx.settings
    with ctx.sessions.begin() as session:
        enqueued = _enqueued_tokens(session)
        spent_tokens, spent_cost = _committed_spend(session, ctx)
    budget = _Budget(ctx, spent_tokens, spent_cost)
    limit = cfg.batch_enqueued_token_limit
    file: list[_Request] = []
    size = tokens = 0
    for request in _free_requests(ctx):
        if limit is not None and request.tokens > limit:
            _too_large(ctx, request, limit)
            continue
        if not budget.admits(request):
            continue
        fits = (len(file) < cfg.batch_file_max_requests
                and size + len(request.line) <= cfg.batch_file_max_bytes
                and (limit is None or tokens + request.tokens <= limit))
        if not fits:
            if not _send_file(ctx, file, enqueued):
                return
            enqueued += tokens
            file, size, tokens = [], 0, 0
        file.append(request)
        size += len(request.line)
        tokens += request.tokens
    if file:
        _send_file(ctx, file, enqueued)
    if budget.skipped and not _has_live(ctx):
        _skip_budget(ctx, budget.skipped)


def _send_file(ctx: _Context, requests: list[_Request], enqueued: int) -> bool:
    """Record, upload and create one provider batch; False if the enqueued-token limit is
    reached (the rest waits for a later poll)."""
    limit = ctx.settings.batch_enqueued_token_limit
    tokens = sum(r.tokens for r in requests)
    if limit is not None and enqueued + tokens > limit:
        logger.info("job %s: %d requests wait: %d tokens enqueued of %d", ctx.job.id,
                    len(requests), enqueued, limit)
        return False
    content = b"".join(r.line for r in requests)
    with ctx.sessions.begin() as session:
        row = ProviderBatch(job_id=ctx.job.id, state=LedgerState.UPLOADING,
                            requests=len(requests), bytes=len(content), tokens=tokens,
                            completed=0, failed=0, cancel_requested=False)
        session.add(row)
        session.flush()
        row_id = row.id
        session.execute(insert(ProviderBatchChunk), [
            {"provider_batch_id": row_id, "chunk_id": r.chunk_id, "live": True} for r in requests
        ])
    _upload(ctx, row_id, content)
    _create(ctx, row_id)
    return True


def _upload(ctx: _Context, row_id: int, content: bytes) -> str:
    file_id = ctx.api.upload(f"docq-job{ctx.job.id}-{row_id}.jsonl", content)
    _update(ctx, row_id, state=LedgerState.UPLOADED, input_file_id=file_id)
    return file_id


def _create(ctx: _Context, row_id: int) -> None:
    with ctx.sessions.begin() as session:
        file_id = session.scalar(select(ProviderBatch.input_file_id)
                                 .where(ProviderBatch.id == row_id))
    assert file_id is not None
    batch = ctx.api.create(file_id, {LEDGER_KEY: str(row_id), "docq_job": str(ctx.job.id)})
    _adopt(ctx, row_id, batch)


def _adopt(ctx: _Context, row_id: int, batch: dict[str, Any]) -> None:
    _update(ctx, row_id, state=LedgerState.CREATED, provider_batch_id=batch["id"],
            provider_status=batch["status"], polled_at=_now())
    ctx.done.sent += 1
    logger.info("job %s: provider batch %s (ledger %s) created", ctx.job.id, batch["id"], row_id)


def _finish_sending(ctx: _Context, row: ProviderBatch, *, cancelled: bool) -> None:
    """A row a crash left before `created`: finish it, creating nothing the provider has."""
    if row.state == LedgerState.UPLOADED:
        found = ctx.api.find(row.id)
        if found is not None:
            _adopt(ctx, row.id, found)
            return
    if cancelled:
        _close(ctx, row.id, [], [], status=None, error="the job was cancelled before it was sent")
        return
    if row.state == LedgerState.UPLOADING:
        _upload(ctx, row.id, _content_again(ctx, row.id))
    _create(ctx, row.id)


def _content_again(ctx: _Context, row_id: int) -> bytes:
    """The file of a row whose upload may not have happened: its linked chunks, in order."""
    with ctx.sessions.begin() as session:
        chunks = list(session.execute(
            select(Chunk.id, Chunk.document_id, Chunk.text)
            .join(ProviderBatchChunk, ProviderBatchChunk.chunk_id == Chunk.id)
            .where(ProviderBatchChunk.provider_batch_id == row_id)
            .order_by(Chunk.document_id, Chunk.seq)
        ))
    return b"".join(_request(ctx, cid, did, text, 0).line for cid, did, text in chunks)


def _free_requests(ctx: _Context) -> Iterator[_Request]:
    """The job's unfinished chunks (reduce steps aside) that no live provider batch holds, as
    requests; those the response cache answers are recorded on the way."""
    last = 0
    while True:
        with ctx.sessions.begin() as session:
            rows = list(session.execute(
                select(Chunk.id, Chunk.document_id, Chunk.text,
                       select(Result.attempts).where(_result_of(ctx.job.version))
                       .scalar_subquery())
                .where(Chunk.job_id == ctx.job.id, Chunk.level == 0, Chunk.id > last,
                       ~_final(ctx.job.version), ~_linked_live())
                .order_by(Chunk.id).limit(READ_CHUNKS)
            ))
        if not rows:
            return
        last = rows[-1][0]
        requests = [_request(ctx, cid, did, text, attempts or 0)
                    for cid, did, text, attempts in rows]
        yield from _answer_from_cache(ctx, requests)


def _request(ctx: _Context, chunk_id: int, document_id: int, text: str,
             attempts: int) -> _Request:
    prompt, max_tokens, key = _prompt(ctx, text)
    body = ctx.bodies.body(prompt, max_tokens)
    return _Request(chunk_id, document_id, attempts, key,
                    line(f"{CUSTOM_ID_PREFIX}{chunk_id}", body), prompt_tokens(prompt),
                    max_tokens)


def _answer_from_cache(ctx: _Context, requests: list[_Request]) -> list[_Request]:
    if ctx.job.cache_policy != CachePolicy.USE or not requests:
        return requests
    with ctx.sessions.begin() as session:
        hits = cache.lookup(session, [r.key for r in requests])
        rows: list[ResultRow] = []
        for r in requests:
            if r.key in hits:
                output, finish = hits[r.key]
                rows.append(leases.blank_result(r.chunk_id, ctx.job.id, r.document_id,
                                                r.attempts) | {
                    "status": ResultStatus.OK, "output": output, "finish_reason": finish,
                    "cost": 0.0, "cached": True})
        leases.record(session, ctx.job.version, rows)
    ctx.done.cached += len(rows)
    return [r for r in requests if r.key not in hits]


class _Budget:
    """The job's budget, with the work already enqueued counted as if it were charged."""

    def __init__(self, ctx: _Context, tokens: int, cost: float) -> None:
        self.ctx, self.tokens, self.cost = ctx, tokens, cost
        price = ctx.settings.price_for(ctx.settings.model_name)
        self.price = price
        self.skipped: list[_Request] = []

    def admits(self, r: _Request) -> bool:
        job = self.ctx.job
        tokens = r.tokens + r.max_tokens  # the most this request can be charged
        cost = 0.0 if self.price is None else self.price.cost(r.tokens, r.max_tokens, "batch")
        over = ((job.budget_tokens is not None and self.tokens + tokens > job.budget_tokens)
                or (job.budget_cost is not None and self.cost + cost > job.budget_cost))
        if over:
            self.skipped.append(r)
            return False
        self.tokens += tokens
        self.cost += cost
        return True


def _committed_spend(session: Session, ctx: _Context) -> tuple[int, float]:
    """What the job's results were charged plus the most its live provider batches can be."""
    tokens, cost = leases.job_spend(session, ctx.job.id)
    if ctx.job.budget_tokens is None and ctx.job.budget_cost is None:
        return tokens, cost
    live_tokens, live_requests = session.execute(
        select(func.coalesce(func.sum(ProviderBatch.tokens), 0),
               func.coalesce(func.sum(ProviderBatch.requests), 0))
        .where(ProviderBatch.job_id == ctx.job.id, ProviderBatch.state != LedgerState.CLOSED)
    ).one()
    out_max = int(live_requests) * ctx.settings.llm_max_tokens
    price = ctx.settings.price_for(ctx.settings.model_name)
    live_cost = 0.0 if price is None else price.cost(int(live_tokens), out_max, "batch")
    return tokens + int(live_tokens) + out_max, cost + live_cost


def _too_large(ctx: _Context, r: _Request, limit: int) -> None:
    """A request no batch can take: its prompt alone is past the enqueued-token limit."""
    with ctx.sessions.begin() as session:
        leases.record(session, ctx.job.version, [
            leases.blank_result(r.chunk_id, ctx.job.id, r.document_id, r.attempts)
            | {"status": ResultStatus.ERROR, "error_type": "RequestTooLargeError",
               "error_message": f"the chunk's prompt is {r.tokens} tokens, more than the "
                                f"enqueued-token limit of {limit} "
                                "(DOCQ_BATCH_ENQUEUED_TOKEN_LIMIT)"}])


def _skip_budget(ctx: _Context, requests: list[_Request]) -> None:
    with ctx.sessions.begin() as session:
        leases.record(session, ctx.job.version, [
            leases.blank_result(r.chunk_id, ctx.job.id, r.document_id, r.attempts)
            | {"status": ResultStatus.SKIPPED_BUDGET,
               "error_message": "the job's budget was spent (or enqueued) before this chunk "
                                "was sent"}
            for r in requests])


def _enqueued_tokens(session: Session) -> int:
    """Prompt tokens in every job's provider batches not closed: the provider's queue."""
    return int(session.scalar(
        select(func.coalesce(func.sum(ProviderBatch.tokens), 0))
        .where(ProviderBatch.state != LedgerState.CLOSED)
    ) or 0)


# -- polling and recording ------------------------------------------------------------------------


def _cancel_live(ctx: _Context) -> None:
    for row in _rows(ctx, (LedgerState.CREATED,)):
        if row.cancel_requested or row.provider_status in TERMINAL:
            continue
        assert row.provider_batch_id is not None
        try:
            status = ctx.api.cancel(row.provider_batch_id)["status"]
        except PermanentError as exc:  # it ended at the provider since the last poll
            logger.info("job %s: provider batch %s not cancelled: %s", ctx.job.id,
                        row.provider_batch_id, exc)
            status = row.provider_status
        _update(ctx, row.id, cancel_requested=True, provider_status=status)


def _poll(ctx: _Context, row: ProviderBatch) -> None:
    assert row.provider_batch_id is not None
    batch = ctx.api.retrieve(row.provider_batch_id)
    ctx.done.polled += 1
    counts = batch.get("request_counts") or {}
    status = batch["status"]
    _update(ctx, row.id, provider_status=status, completed=counts.get("completed", 0),
            failed=counts.get("failed", 0), polled_at=_now(),
            output_file_id=batch.get("output_file_id"), error_file_id=batch.get("error_file_id"))
    if status not in TERMINAL:
        return
    # Read both files before anything is written: a crash here leaves the row `created`, and
    # the next poll reads them again.
    lines = [*_file_lines(ctx, batch.get("output_file_id")),
             *_file_lines(ctx, batch.get("error_file_id"))]
    errors = (batch.get("errors") or {}).get("data") or []
    error = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or None
    entries: list[dict[str, Any]] = []
    if status == "failed":
        rows = _failed_batch_rows(ctx, row.id, error or "the provider failed the batch")
    else:
        rows, entries = _result_rows(ctx, row.id, lines)
    _close(ctx, row.id, rows, entries, status=status, error=error)
    if error:
        logger.warning("job %s: provider batch %s %s: %s", ctx.job.id, row.provider_batch_id,
                       status, error)


def _file_lines(ctx: _Context, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(raw) for raw in ctx.api.content(file_id).splitlines() if raw.strip()]


def _result_rows(ctx: _Context, row_id: int, lines: list[dict[str, Any]]
                 ) -> tuple[list[ResultRow], list[dict[str, Any]]]:
    """Result rows (and cache entries) for the lines that ran; lines that never ran (expired,
    cancelled) get none, so their chunks stay unfinished."""
    with ctx.sessions.begin() as session:
        linked = {
            cid: (did, attempts or 0, text)
            for cid, did, text, attempts in session.execute(
                select(Chunk.id, Chunk.document_id, Chunk.text,
                       select(Result.attempts).where(_result_of(ctx.job.version))
                       .scalar_subquery())
                .join(ProviderBatchChunk, ProviderBatchChunk.chunk_id == Chunk.id)
                .where(ProviderBatchChunk.provider_batch_id == row_id)
            )
        }
    rows: list[ResultRow] = []
    entries: list[dict[str, Any]] = []
    for item in lines:
        chunk_id = _chunk_of(item.get("custom_id"))
        response = item.get("response")
        if chunk_id is None or chunk_id not in linked or not isinstance(response, dict):
            continue
        document_id, attempts, text = linked[chunk_id]
        row = leases.blank_result(chunk_id, ctx.job.id, document_id, attempts + 1)
        entry = _line_result(ctx, row, response, text)
        rows.append(row)
        if entry is not None:
            entries.append(entry)
    return rows, entries


def _failed_batch_rows(ctx: _Context, row_id: int, error: str) -> list[ResultRow]:
    """A batch the provider failed as a whole (validation, the enqueued-token limit): an
    attempt for each of its chunks, so a batch that keeps failing ends in error rows rather
    than being sent again at every poll."""
    with ctx.sessions.begin() as session:
        linked = session.execute(
            select(Chunk.id, Chunk.document_id,
                   select(Result.attempts).where(_result_of(ctx.job.version)).scalar_subquery())
            .join(ProviderBatchChunk, ProviderBatchChunk.chunk_id == Chunk.id)
            .where(ProviderBatchChunk.provider_batch_id == row_id)
        ).all()
    rows = []
    for chunk_id, document_id, attempts in linked:
        row = leases.blank_result(chunk_id, ctx.job.id, document_id, (attempts or 0) + 1)
        row.update({"error_type": "ProviderBatchFailed", "error_message": error})
        _settle_failure(ctx.settings, row, retryable=True)
        rows.append(row)
    return rows


def _chunk_of(custom_id: Any) -> int | None:
    if isinstance(custom_id, str) and custom_id.startswith(CUSTOM_ID_PREFIX):
        tail = custom_id[len(CUSTOM_ID_PREFIX):]
        return int(tail) if tail.isdigit() else None
    return None


def _line_result(ctx: _Context, row: ResultRow, response: dict[str, Any], text: str
                 ) -> dict[str, Any] | None:
    """Fill `row` from one line's response; the cache entry of a good answer."""
    cfg = ctx.settings
    status = int(response.get("status_code") or 0)
    body = response.get("body") or {}
    if status != 200:
        error = body["error"] if isinstance(body.get("error"), dict) else {}
        message = f"HTTP {status} {error.get('code') or ''}: {error.get('message') or ''}"
        row.update({"http_status": status, "error_type": "BatchLineError",
                    "error_message": message.replace("  ", " ")})
        retryable = status in RETRYABLE_LINE_STATUSES
        _settle_failure(cfg, row, retryable)
        return None
    choice = (body.get("choices") or [{}])[0]
    answer = (choice.get("message") or {}).get("content") or ""
    finish = choice.get("finish_reason")
    usage = body.get("usage") or {}
    tokens_in, tokens_out = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens",
                                                                             0))
    price = cfg.price_for(cfg.model_name)
    row.update({"finish_reason": finish, "tokens_in": tokens_in, "tokens_out": tokens_out,
                "cost": None if price is None else price.cost(tokens_in, tokens_out, "batch")})
    try:
        row["output"] = ctx.pipeline.parse(answer, finish)
    except PermanentError as exc:
        row.update({"error_type": type(exc).__name__, "error_message": str(exc)})
        _settle_failure(cfg, row, retryable=False)
        return None
    except RetryableError as exc:
        row.update({"error_type": type(exc).__name__, "error_message": str(exc)})
        _settle_failure(cfg, row, retryable=True)
        return None
    row["status"] = ResultStatus.OK
    if ctx.job.cache_policy == CachePolicy.OFF:
        return None
    return {"key": _prompt(ctx, text)[2], "output": row["output"],
            "model": cfg.model_name, "finish_reason": finish, "tokens_in": tokens_in,
            "tokens_out": tokens_out}


def _prompt(ctx: _Context, text: str) -> tuple[Prompt, int, str]:
    """A chunk's prompt, max_tokens and response-cache key, as the online lane makes them."""
    cfg = ctx.settings
    prompt = ctx.pipeline.render(text, cfg.mode)
    max_tokens = min(prompt.max_tokens or cfg.llm_max_tokens, cfg.llm_max_tokens)
    key = cache.cache_key(ctx.endpoint, cfg.model_name, ctx.job.version, prompt, max_tokens,
                          cfg.llm_temperature)
    return prompt, max_tokens, key


def _settle_failure(cfg: Settings, row: ResultRow, retryable: bool) -> None:
    """A failed line: tried again in a later batch while attempts remain, else final."""
    final = not retryable or row["attempts"] >= cfg.max_attempts
    row["status"] = ResultStatus.ERROR if final else ResultStatus.RETRY
    if final and retryable:
        row["error_message"] = (f"gave up after {row['attempts']} attempts; last error: "
                                f"{row['error_message']}")


def _close(ctx: _Context, row_id: int, rows: list[ResultRow], entries: list[dict[str, Any]],
           *, status: str | None, error: str | None) -> None:
    """Record a provider batch's rows, close it and free its chunks: one transaction."""
    with ctx.sessions.begin() as session:
        leases.record(session, ctx.job.version, rows)
        cache.store(session, entries, refresh=ctx.job.cache_policy == CachePolicy.REFRESH)
        values: dict[str, Any] = {"state": LedgerState.CLOSED, "closed_at": _now(),
                                  "error": error}
        if status is not None:
            values["provider_status"] = status
        session.execute(update(ProviderBatch).where(ProviderBatch.id == row_id).values(**values))
        session.execute(update(ProviderBatchChunk)
                        .where(ProviderBatchChunk.provider_batch_id == row_id)
                        .values(live=False))
    ctx.done.closed += 1
    ctx.done.recorded += len(rows)


def _finalize_cancelled(session: Session, job: JobView) -> None:
    """A cancelled job with nothing live: its chunks without a final row end `cancelled`."""
    rows = session.execute(
        select(Chunk.id, Chunk.document_id,
               select(Result.attempts).where(_result_of(job.version)).scalar_subquery())
        .where(Chunk.job_id == job.id, ~_final(job.version))
    ).all()
    for start in range(0, len(rows), READ_CHUNKS):
        part = rows[start:start + READ_CHUNKS]
        leases.record(session, job.version, [
            leases.blank_result(cid, job.id, did, attempts or 0)
            | {"status": ResultStatus.CANCELLED, "error_message": CANCELLED_MESSAGE}
            for cid, did, attempts in part])


# -- queries --------------------------------------------------------------------------------------


def _result_of(version: str) -> Any:
    return and_(Result.chunk_id == Chunk.id, Result.pipeline_version == version)


def _final(version: str) -> Any:
    return exists().where(_result_of(version), Result.status.in_(FINAL_RESULT_STATES))


def _linked_live() -> Any:
    return exists().where(ProviderBatchChunk.chunk_id == Chunk.id, ProviderBatchChunk.live)


def _live_links(session: Session, job_id: int) -> int:
    return int(session.scalar(
        select(func.count()).select_from(ProviderBatch)
        .where(ProviderBatch.job_id == job_id, ProviderBatch.state != LedgerState.CLOSED)
    ) or 0)


def _has_live(ctx: _Context) -> bool:
    with ctx.sessions.begin() as session:
        return _live_links(session, ctx.job.id) > 0


def _unfinished(session: Session, job: JobView) -> int:
    """The job's chunks still to be answered through the provider's batches. Reduce steps
    (level > 0) are not among them: `jobs.merge`, sent once these are done, makes them and
    sends them online (workers/jobs/merging.py), as it does for an online job."""
    return int(session.scalar(
        select(func.count()).select_from(Chunk)
        .where(Chunk.job_id == job.id, Chunk.level == 0, ~_final(job.version))
    ) or 0)


def _now() -> datetime:
    return datetime.now(UTC)


class ProviderBatchInfo(TypedDict):
    """One provider batch of a batch-lane job, as `docq status` shows it."""

    ledger: int  # the ledger row's id
    id: str | None  # the provider's batch id; None until it is created
    state: LedgerState  # the ledger's own step: uploading, uploaded, created, closed
    status: str | None  # the provider's status (validating, in_progress, completed, ...)
    requests: int
    completed: int
    failed: int
    age_s: float


def provider_batches(session: Session, job_id: int) -> list[ProviderBatchInfo]:
    """The job's provider batches for `docq status`: id, status, counts, age."""
    now = _now()
    out: list[ProviderBatchInfo] = []
    for row in session.scalars(select(ProviderBatch).where(ProviderBatch.job_id == job_id)
                               .order_by(ProviderBatch.id)):
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        out.append({
            "ledger": row.id, "id": row.provider_batch_id, "state": LedgerState(row.state),
            "status": row.provider_status, "requests": row.requests,
            "completed": row.completed, "failed": row.failed,
            "age_s": round((now - created).total_seconds(), 1),
        })
    return out
