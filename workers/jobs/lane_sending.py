"""The batch lane's sending: a job's free chunks cut into Batch API files and sent.

Guarantees: every call to the provider follows a commit that says what it is about to do (a
ledger row `uploading` with its chunk links, then `uploaded` with the file id, then `created`
with the provider batch id), so a crash anywhere is finished by the next `advance` without
sending a chunk twice (`finish_sending`). A file stays within the provider's limits (requests,
bytes, enqueued tokens), and the job's budget counts what is enqueued at `max_tokens` and the
batch price before it is charged (`_Budget`, `_committed_spend`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, insert, select
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
from docqueue.workers.batch.calls import prompt_tokens
from docqueue.workers.batch.leases import ResultRow
from docqueue.workers.clock import utc_now
from docqueue.workers.jobs.lane_ledger import (
    READ_CHUNKS,
    LaneContext,
    LaneRequest,
    enqueued_tokens,
    final,
    has_live,
    linked_live,
    prompt_of,
    result_of,
    update_row,
)
from docqueue.workers.jobs.lane_recording import CUSTOM_ID_PREFIX, close
from docqueue.workers.provider.batch_api import LEDGER_KEY, line

logger = logging.getLogger(__name__)


def send_new(ctx: LaneContext) -> None:
    """Cut the job's free unfinished chunks into files within every limit, and send them."""
    cfg = ctx.settings
    with ctx.sessions.begin() as session:
        enqueued = enqueued_tokens(session)
        spent_tokens, spent_cost = _committed_spend(session, ctx)
    budget = _Budget(ctx, spent_tokens, spent_cost)
    limit = cfg.batch_enqueued_token_limit
    file: list[LaneRequest] = []
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
    if budget.skipped and not has_live(ctx):
        _skip_budget(ctx, budget.skipped)


def _send_file(ctx: LaneContext, requests: list[LaneRequest], enqueued: int) -> bool:
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


def _upload(ctx: LaneContext, row_id: int, content: bytes) -> str:
    file_id: str = ctx.api.upload(f"docq-job{ctx.job.id}-{row_id}.jsonl", content)
    update_row(ctx, row_id, state=LedgerState.UPLOADED, input_file_id=file_id)
    return file_id


def _create(ctx: LaneContext, row_id: int) -> None:
    with ctx.sessions.begin() as session:
        file_id = session.scalar(select(ProviderBatch.input_file_id)
                                 .where(ProviderBatch.id == row_id))
    assert file_id is not None
    created = ctx.api.create(file_id, {LEDGER_KEY: str(row_id), "docq_job": str(ctx.job.id)})
    _adopt(ctx, row_id, created)


def _adopt(ctx: LaneContext, row_id: int, provider_batch: dict[str, Any]) -> None:
    update_row(ctx, row_id, state=LedgerState.CREATED, provider_batch_id=provider_batch["id"],
               provider_status=provider_batch["status"], polled_at=utc_now())
    ctx.done.sent += 1
    logger.info("job %s: provider batch %s (ledger %s) created", ctx.job.id,
                provider_batch["id"], row_id)


def finish_sending(ctx: LaneContext, row: ProviderBatch, *, cancelled: bool) -> None:
    """A row a crash left before `created`: finish it, creating nothing the provider has."""
    if row.state == LedgerState.UPLOADED:
        found = ctx.api.find(row.id)
        if found is not None:
            _adopt(ctx, row.id, found)
            return
    if cancelled:
        close(ctx, row.id, [], [], status=None, error="the job was cancelled before it was sent")
        return
    if row.state == LedgerState.UPLOADING:
        _upload(ctx, row.id, _content_again(ctx, row.id))
    _create(ctx, row.id)


def _content_again(ctx: LaneContext, row_id: int) -> bytes:
    """The file of a row whose upload may not have happened: its linked chunks, in order."""
    with ctx.sessions.begin() as session:
        chunks = list(session.execute(
            select(Chunk.id, Chunk.document_id, Chunk.text)
            .join(ProviderBatchChunk, ProviderBatchChunk.chunk_id == Chunk.id)
            .where(ProviderBatchChunk.provider_batch_id == row_id)
            .order_by(Chunk.document_id, Chunk.seq)
        ))
    return b"".join(_request(ctx, cid, did, text, 0).line for cid, did, text in chunks)


def _free_requests(ctx: LaneContext) -> Iterator[LaneRequest]:
    """The job's unfinished chunks (reduce steps aside) that no live provider batch holds, as
    requests; those the response cache answers are recorded on the way."""
    last = 0
    while True:
        with ctx.sessions.begin() as session:
            rows = list(session.execute(
                select(Chunk.id, Chunk.document_id, Chunk.text,
                       select(Result.attempts).where(result_of(ctx.job.version))
                       .scalar_subquery())
                .where(Chunk.job_id == ctx.job.id, Chunk.level == 0, Chunk.id > last,
                       ~final(ctx.job.version), ~linked_live())
                .order_by(Chunk.id).limit(READ_CHUNKS)
            ))
        if not rows:
            return
        last = rows[-1][0]
        requests = [_request(ctx, cid, did, text, attempts or 0)
                    for cid, did, text, attempts in rows]
        yield from _answer_from_cache(ctx, requests)


def _request(ctx: LaneContext, chunk_id: int, document_id: int, text: str,
             attempts: int) -> LaneRequest:
    prompt, max_tokens, key = prompt_of(ctx, text)
    body = ctx.bodies.body(prompt, max_tokens)
    return LaneRequest(chunk_id, document_id, attempts, key,
                    line(f"{CUSTOM_ID_PREFIX}{chunk_id}", body), prompt_tokens(prompt),
                    max_tokens)


def _answer_from_cache(ctx: LaneContext, requests: list[LaneRequest]) -> list[LaneRequest]:
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

    def __init__(self, ctx: LaneContext, tokens: int, cost: float) -> None:
        self.ctx, self.tokens, self.cost = ctx, tokens, cost
        price = ctx.settings.price_for(ctx.settings.model_name)
        self.price = price
        self.skipped: list[LaneRequest] = []

    def admits(self, r: LaneRequest) -> bool:
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


def _committed_spend(session: Session, ctx: LaneContext) -> tuple[int, float]:
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


def _too_large(ctx: LaneContext, r: LaneRequest, limit: int) -> None:
    """A request no batch can take: its prompt alone is past the enqueued-token limit."""
    with ctx.sessions.begin() as session:
        leases.record(session, ctx.job.version, [
            leases.blank_result(r.chunk_id, ctx.job.id, r.document_id, r.attempts)
            | {"status": ResultStatus.ERROR, "error_type": "RequestTooLargeError",
               "error_message": f"the chunk's prompt is {r.tokens} tokens, more than the "
                                f"enqueued-token limit of {limit} "
                                f"(DOCQ_BATCH_ENQUEUED_TOKEN_LIMIT)"}])


def _skip_budget(ctx: LaneContext, requests: list[LaneRequest]) -> None:
    with ctx.sessions.begin() as session:
        leases.record(session, ctx.job.version, [
            leases.blank_result(r.chunk_id, ctx.job.id, r.document_id, r.attempts)
            | {"status": ResultStatus.SKIPPED_BUDGET,
               "error_message": "the job's budget was spent (or enqueued) before this chunk "
                                "was sent"}
            for r in requests])

