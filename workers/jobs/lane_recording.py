"""The batch lane's recording: polling provider batches and writing what they answered.

Guarantees: a terminal provider batch's output and error files are read in full before anything
is written, and its result rows, cache entries, the closing of its ledger row and the unlinking
of its chunks are one transaction, so a crash anywhere is read again by the next poll and never
half recorded. A line that failed retryably gets a `retry` row (sent again in a later provider
batch) until DOCQ_MAX_ATTEMPTS; a line that never ran (expired, cancelled) gets no row at all; a
provider batch failed whole is an attempt for each of its chunks.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from docqueue.models import (
    Chunk,
    LedgerState,
    ProviderBatch,
    ProviderBatchChunk,
    Result,
    ResultStatus,
)
from docqueue.workers.batch import cache, leases
from docqueue.workers.batch.cache import CachePolicy
from docqueue.workers.batch.calls import CANCELLED_MESSAGE
from docqueue.workers.batch.leases import ResultRow
from docqueue.workers.clock import utc_now
from docqueue.workers.errors import PermanentError, RetryableError
from docqueue.workers.jobs.lane_ledger import (
    READ_CHUNKS,
    JobView,
    LaneContext,
    final,
    prompt_of,
    result_of,
    rows_in,
    update_row,
)
from docqueue.workers.provider.batch_api import TERMINAL
from docqueue.workers.provider.prompt_cache import usage_cached_tokens
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

CUSTOM_ID_PREFIX = "chunk-"
RETRYABLE_LINE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def cancel_live(ctx: LaneContext) -> None:
    for row in rows_in(ctx, (LedgerState.CREATED,)):
        if row.cancel_requested or row.provider_status in TERMINAL:
            continue
        assert row.provider_batch_id is not None
        try:
            status = ctx.api.cancel(row.provider_batch_id)["status"]
        except PermanentError as exc:  # it ended at the provider since the last poll
            logger.info("job %s: provider batch %s not cancelled: %s", ctx.job.id,
                        row.provider_batch_id, exc)
            status = row.provider_status
        update_row(ctx, row.id, cancel_requested=True, provider_status=status)


def poll(ctx: LaneContext, row: ProviderBatch) -> None:
    assert row.provider_batch_id is not None
    found = ctx.api.retrieve(row.provider_batch_id)
    ctx.done.polled += 1
    counts = found.get("request_counts") or {}
    status = found["status"]
    update_row(ctx, row.id, provider_status=status, completed=counts.get("completed", 0),
               failed=counts.get("failed", 0), polled_at=utc_now(),
               output_file_id=found.get("output_file_id"),
               error_file_id=found.get("error_file_id"))
    if status not in TERMINAL:
        return
    # Read both files before anything is written: a crash here leaves the row `created`, and
    # the next poll reads them again.
    lines = [*_file_lines(ctx, found.get("output_file_id")),
             *_file_lines(ctx, found.get("error_file_id"))]
    errors = (found.get("errors") or {}).get("data") or []
    error = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or None
    entries: list[dict[str, Any]] = []
    if status == "failed":
        rows = _failed_provider_batch_rows(ctx, row.id, error or "the provider failed the batch")
    else:
        rows, entries = _result_rows(ctx, row.id, lines)
    close(ctx, row.id, rows, entries, status=status, error=error)
    if error:
        logger.warning("job %s: provider batch %s %s: %s", ctx.job.id, row.provider_batch_id,
                       status, error)


def _file_lines(ctx: LaneContext, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    return [json.loads(raw) for raw in ctx.api.content(file_id).splitlines() if raw.strip()]


def _result_rows(ctx: LaneContext, row_id: int, lines: list[dict[str, Any]]
                 ) -> tuple[list[ResultRow], list[dict[str, Any]]]:
    """Result rows (and cache entries) for the lines that ran; lines that never ran (expired,
    cancelled) get none, so their chunks stay unfinished."""
    with ctx.sessions.begin() as session:
        linked = {
            cid: (did, attempts or 0, text)
            for cid, did, text, attempts in session.execute(
                select(Chunk.id, Chunk.document_id, Chunk.text,
                       select(Result.attempts).where(result_of(ctx.job.version))
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


def _failed_provider_batch_rows(ctx: LaneContext, row_id: int, error: str) -> list[ResultRow]:
    """A batch the provider failed as a whole (validation, the enqueued-token limit): an
    attempt for each of its chunks, so a batch that keeps failing ends in error rows rather
    than being sent again at every poll."""
    with ctx.sessions.begin() as session:
        linked = session.execute(
            select(Chunk.id, Chunk.document_id,
                   select(Result.attempts).where(result_of(ctx.job.version)).scalar_subquery())
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


def _line_result(ctx: LaneContext, row: ResultRow, response: dict[str, Any], text: str
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
    cached = min(usage_cached_tokens(usage), tokens_in)
    price = cfg.price_for(cfg.model_name)
    row.update({"finish_reason": finish, "tokens_in": tokens_in, "tokens_in_cached": cached,
                "tokens_out": tokens_out, "cost": None if price is None else price.cost(
                    tokens_in, tokens_out, "batch", cached=cached)})
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
    return {"key": prompt_of(ctx, text)[2], "output": row["output"],
            "model": cfg.model_name, "finish_reason": finish, "tokens_in": tokens_in,
            "tokens_out": tokens_out}


def _settle_failure(cfg: Settings, row: ResultRow, retryable: bool) -> None:
    """A failed line: tried again in a later batch while attempts remain, else final."""
    final = not retryable or row["attempts"] >= cfg.max_attempts
    row["status"] = ResultStatus.ERROR if final else ResultStatus.RETRY
    if final and retryable:
        row["error_message"] = (f"gave up after {row['attempts']} attempts; last error: "
                                f"{row['error_message']}")


def close(ctx: LaneContext, row_id: int, rows: list[ResultRow], entries: list[dict[str, Any]],
           *, status: str | None, error: str | None) -> None:
    """Record a provider batch's rows, close it and free its chunks: one transaction."""
    with ctx.sessions.begin() as session:
        leases.record(session, ctx.job.version, rows)
        cache.store(session, entries, refresh=ctx.job.cache_policy == CachePolicy.REFRESH)
        values: dict[str, Any] = {"state": LedgerState.CLOSED, "closed_at": utc_now(),
                                  "error": error}
        if status is not None:
            values["provider_status"] = status
        session.execute(update(ProviderBatch).where(ProviderBatch.id == row_id).values(**values))
        session.execute(update(ProviderBatchChunk)
                        .where(ProviderBatchChunk.provider_batch_id == row_id)
                        .values(live=False))
    ctx.done.closed += 1
    ctx.done.recorded += len(rows)


def finalize_cancelled(session: Session, job: JobView) -> None:
    """A cancelled job with nothing live: its chunks without a final row end `cancelled`."""
    rows = session.execute(
        select(Chunk.id, Chunk.document_id,
               select(Result.attempts).where(result_of(job.version)).scalar_subquery())
        .where(Chunk.job_id == job.id, ~final(job.version))
    ).all()
    for start in range(0, len(rows), READ_CHUNKS):
        part = rows[start:start + READ_CHUNKS]
        leases.record(session, job.version, [
            leases.blank_result(cid, job.id, did, attempts or 0)
            | {"status": ResultStatus.CANCELLED, "error_message": CANCELLED_MESSAGE}
            for cid, did, attempts in part])


