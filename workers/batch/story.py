"""What a batch came to, for its task's result (Flower shows it): counts, tokens, cost, and
the ids of its failed chunks under each one-line reason.

Read from the store when the batch is done, so it tells the batch's whole story, whichever
deliveries wrote it. It never holds a chunk's text or a model's output: a reason that would
quote the output (a parse error) names only the kind of failure.
"""

from __future__ import annotations

import textwrap
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from docqueue.models import Batch, Chunk, Job, Result, ResultStatus

REASON_CHARS = 160
MAX_REASONS = 5  # distinct reasons listed; Celery's event shows ~1 KB of a result


def batch_story(session: Session, batch_id: int) -> dict[str, Any] | None:
    """The counts and failures of the batch's chunks; None if the batch is gone."""
    found = session.execute(
        select(Batch.job_id, Batch.seq, Job.pipeline_version)
        .join(Job, Job.id == Batch.job_id).where(Batch.id == batch_id)).one_or_none()
    if found is None:
        return None
    job_id, seq, version = found
    rows = session.execute(
        select(Chunk.id, Result.status, Result.cached, Result.tokens_in, Result.tokens_out,
               Result.cost, Result.attempts, Result.error_type, Result.error_message,
               Result.http_status)
        .outerjoin(Result, (Result.chunk_id == Chunk.id) & (Result.pipeline_version == version))
        .where(Chunk.job_id == job_id, Chunk.batch_seq == seq).order_by(Chunk.id)).all()
    counts = dict.fromkeys(("ok", "errors", "cached", "skipped", "cancelled", "unfinished"), 0)
    failed: dict[str, list[int]] = {}
    for r in rows:
        counts[_count_of(r.status, r.cached)] += 1
        if r.status == ResultStatus.ERROR:
            why = reason(r.error_type, r.error_message, r.http_status)
            if why in failed or len(failed) < MAX_REASONS:
                failed.setdefault(why, []).append(r.id)
    costs = [r.cost for r in rows if r.cost is not None]
    return {
        "batch_id": batch_id, "job_id": job_id, "chunks": len(rows), **counts,
        "calls": sum(r.attempts or 0 for r in rows if not r.cached),
        "tokens_in": sum(r.tokens_in or 0 for r in rows),
        "tokens_out": sum(r.tokens_out or 0 for r in rows),
        "cost": round(sum(costs), 8) if costs else None,
        "failed": failed,  # reason -> the ids of the chunks that failed for it
    }


_COUNTED_AS: dict[str, str] = {
    ResultStatus.ERROR: "errors", ResultStatus.SKIPPED_BUDGET: "skipped",
    ResultStatus.CANCELLED: "cancelled",
}


def _count_of(status: str | None, cached: bool | None) -> str:
    if status == ResultStatus.OK:
        return "cached" if cached else "ok"
    return _COUNTED_AS.get(status or "", "unfinished")


def reason(error_type: str | None, message: str | None, http_status: int | None) -> str:
    """A failure in one line: its kind, its HTTP status, the message (unless it quotes output)."""
    kind = error_type or "failed"
    if http_status is not None and f"HTTP {http_status}" not in (message or ""):
        kind += f" (HTTP {http_status})"
    if error_type == "OutputParseError":
        return f"{kind}: the model's output could not be used"
    if not message:
        return kind
    return textwrap.shorten(f"{kind}: {message}", REASON_CHARS, placeholder=" ...")
