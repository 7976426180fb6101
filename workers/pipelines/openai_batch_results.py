"""Writing a finished openai-batch job's results as OpenAI's output and error files.

Guarantees: every input line is accounted for exactly once, in input order: a success in the
output file, anything else (turned away when read, failed, cancelled, not finished) in the error
file, shaped as OpenAI shapes them. Line ids are derived from the job and document ids, so
writing the files again gives the same bytes. A job not yet final is refused
(`JobNotFinishedError`): its files would not account for every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from docqueue.models import (
    FINAL_JOB_STATES,
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobStatus,
    Result,
    ResultStatus,
)
from docqueue.workers.errors import InputError, JobNotFoundError, WorkerError
from docqueue.workers.pipelines.openai_batch import PIPELINE_NAME
from docqueue.workers.pipelines.openai_batch_requests import COMPLETIONS_URL


class JobNotFinishedError(WorkerError):
    """The job is still running: its result files would not yet account for every request."""


@dataclass(frozen=True)
class _Row:
    document_id: int
    custom_id: str
    rejected: str | None  # why the line was turned away when the file was read
    meta: dict[str, Any]
    state: str | None
    output: Any
    error_type: str | None
    error_message: str | None
    http_status: int | None
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    created_s: int


def write_openai_batch_results(
    session: Session, job_id: int, output_path: str | os.PathLike[str],
    error_path: str | os.PathLike[str],
) -> tuple[int, int]:
    """Write a finished job's output and error files in OpenAI's format, in input order.

    Returns (lines in the output file, lines in the error file).

    Raises:
        JobNotFoundError: there is no such job.
        InputError: the job did not run the openai-batch pipeline.
        JobNotFinishedError: the job is not in a final state yet.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist")
    if job.pipeline != PIPELINE_NAME:
        raise InputError(
            f"job {job_id} ran the {job.pipeline!r} pipeline; OpenAI Batch result files need a "
            f"job submitted with --pipeline {PIPELINE_NAME}"
        )
    if job.status not in FINAL_JOB_STATES:
        raise JobNotFinishedError(
            f"job {job_id} is still {job.status}; its result files can be written once it "
            "is finished (see `docq status --watch`)"
        )
    written = [0, 0]
    with open(output_path, "w", encoding="utf-8") as out, \
            open(error_path, "w", encoding="utf-8") as err:
        for row in _rows(session, job):
            record, ok = _record(job, row)
            _write_line(out if ok else err, record)
            written[0 if ok else 1] += 1
    return written[0], written[1]


def _write_line(stream: IO[str], record: dict[str, Any]) -> None:
    stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def _rows(session: Session, job: Job) -> Iterator[_Row]:
    query = (
        select(
            Document.id, Document.external_id, Document.status.label("doc_status"),
            Document.error, Document.meta, Result.status.label("state"), Result.output,
            Result.error_type, Result.error_message, Result.http_status, Result.finish_reason,
            Result.tokens_in, Result.tokens_out, Result.updated_at,
        )
        .outerjoin(Chunk, Chunk.document_id == Document.id)
        .outerjoin(Result, and_(Result.chunk_id == Chunk.id,
                                Result.pipeline_version == job.pipeline_version))
        .where(Document.job_id == job.id)
        .order_by(Document.id)
        .execution_options(yield_per=1000)
    )
    for r in session.execute(query):
        yield _Row(
            document_id=r.id,
            custom_id=r.external_id,
            rejected=r.error if r.doc_status == DocumentStatus.REJECTED else None,
            meta=r.meta or {},
            state=r.state,
            output=r.output,
            error_type=r.error_type,
            error_message=r.error_message,
            http_status=r.http_status,
            finish_reason=r.finish_reason,
            tokens_in=r.tokens_in or 0,
            tokens_out=r.tokens_out or 0,
            created_s=int(r.updated_at.timestamp()) if r.updated_at is not None else 0,
        )


def _record(job: Job, row: _Row) -> tuple[dict[str, Any], bool]:
    """The line for one request, and whether it belongs in the output file."""
    digest = hashlib.sha256(f"docq:{job.id}:{row.document_id}".encode()).hexdigest()
    custom_id = row.meta.get("custom_id", row.custom_id)
    record: dict[str, Any] = {"id": f"batch_req_{digest[:24]}", "custom_id": custom_id}
    request_id = f"req_{digest[24:56]}"
    if row.rejected is not None:
        code, status = row.meta.get("error_code") or "invalid_request", row.meta.get("http_status")
        if status is None:
            return {**record, "response": None, "error": _error(code, row.rejected)}, False
        body = _error_body(status, row.rejected, code, row.meta.get("error_param"))
        return {**record, "response": _response(status, request_id, body), "error": None}, False
    if row.state == ResultStatus.OK:
        body = _success_body(job, row, digest)
        return {**record, "response": _response(200, request_id, body), "error": None}, True
    if row.state == ResultStatus.ERROR and row.http_status is not None:
        code, message = _provider_error(row.error_message or "")
        body = _error_body(row.http_status, message, code, None)
        return {**record, "response": _response(row.http_status, request_id, body),
                "error": None}, False
    code, message = _other_error(job, row)
    return {**record, "response": None, "error": _error(code, message)}, False


def _response(status: int, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"status_code": status, "request_id": request_id, "body": body}


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}


def _error_body(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# workers/provider/client.py words a provider's error as "HTTP <status> <code>: <message>"; after
# retries the processor prefixes "gave up after N attempts; last error: ".
_PROVIDER_ERROR = re.compile(r"HTTP \d{3}(?: (?P<code>[\w.-]+))?: (?P<message>.*)", re.DOTALL)
# What workers/provider/client.py says when a call got no HTTP response, and OpenAI-style codes
# for it.
_NO_RESPONSE = (
    ("did not answer within", "request_timeout"),
    ("could not connect", "connection_error"),
    ("malformed response", "malformed_response"),
)


def _provider_error(text: str) -> tuple[str | None, str]:
    """The provider's code, and the message (the provider's own when nothing wraps it)."""
    found = _PROVIDER_ERROR.search(text)
    if found is None:
        return None, text
    return found.group("code"), found.group("message") if found.start() == 0 else text


def _other_error(job: Job, row: _Row) -> tuple[str, str]:
    """(code, message) for a request that got no HTTP error response."""
    if row.state == ResultStatus.CANCELLED or (
        row.state in (None, ResultStatus.RETRY) and job.status == JobStatus.CANCELLED
    ):
        return "batch_cancelled", row.error_message or f"job {job.id} was cancelled"
    if row.state == ResultStatus.SKIPPED_BUDGET:
        return "budget_exceeded", row.error_message or f"job {job.id} ran out of budget"
    if row.state == ResultStatus.ERROR:
        # No HTTP status: a timeout, a lost connection, a malformed reply, a lost batch.
        message = row.error_message or "the request failed"
        code = next((c for phrase, c in _NO_RESPONSE if phrase in message), None)
        if code is None:
            # PoisonChunk: a chunk whose workers kept dying; BatchAbandoned: the same, as rows
            # written before the guard was per chunk.
            abandoned = row.error_type in ("PoisonChunk", "BatchAbandoned")
            code = "batch_abandoned" if abandoned else "request_failed"
        return code, message
    return "not_finished", f"job {job.id} ended ({job.status}) before this request was finished"


def _success_body(job: Job, row: _Row, digest: str) -> dict[str, Any]:
    output = row.output if isinstance(row.output, dict) else {}
    content = output.get("content", "")
    finish = row.finish_reason or output.get("finish_reason")
    usage = {"prompt_tokens": row.tokens_in, "completion_tokens": row.tokens_out,
             "total_tokens": row.tokens_in + row.tokens_out}
    common = {"created": row.created_s, "model": job.model}
    if row.meta.get("url") == COMPLETIONS_URL:
        choice = {"text": content, "index": 0, "logprobs": None, "finish_reason": finish}
        return {"id": f"cmpl-{digest[:29]}", "object": "text_completion", **common,
                "choices": [choice], "usage": usage}
    message = {"role": "assistant", "content": content, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {"id": f"chatcmpl-{digest[:29]}", "object": "chat.completion", **common,
            "choices": [choice], "usage": usage, "system_fingerprint": None}
