"""OpenAI Batch files: read one as documents, run it as a pipeline, write OpenAI's result files.

An input line is `{"custom_id", "method": "POST", "url", "body"}` for `/v1/chat/completions` or
`/v1/completions`. Each line becomes one document (its id the `custom_id`, its text the request
as canonical JSON) and one chunk, which the workers send to the job's endpoint through the same
limiter, retries and store as any other chunk. `write_batch_results` then writes OpenAI's two
files, in input order: the output file holds one line per successful request, the error file
one line per failed request, so every input line is accounted for exactly once.

What a request may ask for, and what it gets:
- The job's configured model answers every request: the body's `model` is recorded in the
  document's metadata (`requested_model`), and the output body's `model` names the one that
  answered.
- `max_tokens` (or `max_completion_tokens`) is capped by the job's `llm_max_tokens`, which is
  also the default when the body gives none.
- Generation fields in `PASSED_PARAMS` are sent as they are; `stop` and, for chat,
  `response_format` too. `n` and `best_of` must be 1 and `stream` false; `metadata` and
  `store` are ignored. Any other field (tools, logprobs, echo, ...) is a line error rather
  than something silently dropped.
- Chat message content may be a string or a list of text parts (joined with newlines); the
  `developer` role is sent as `system`. A completion `prompt` is one string (or a list of one).

Lines that cannot run become line errors and the rest go on. Problems with the line itself
(not JSON, no usable custom_id, method, url) are reported in the error line's `error`, as OpenAI
reports a failure that got no HTTP response; problems with the body are reported as the 400
response the endpoint would have given. A repeated custom_id stays with its first line; the
repeat is an error line whose custom_id is null, so each custom_id names one request in the
files. A file over OpenAI's limits (50,000 requests, 200 MB) is refused whole, before anything
is stored.

The files are written once the job is final (they would not account for every request
before). A request without a final result then (a cancelled job's) is an error line with code
`batch_cancelled`, or `not_finished`. The `id` and `request_id` of each line are derived from
the job and document ids, so writing the files again gives the same bytes; the provider's own
request ids are not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
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
from docqueue.workers.errors import InputError, JobNotFoundError, PipelineError, WorkerError
from docqueue.workers.ingest.sources import MAX_ID_CHARS, SourceDocument
from docqueue.workers.ingest.sources import (
    _lines as bounded_lines,  # the JSONL reader's bounded line reader
)
from docqueue.workers.pipelines.base import Mode, Pipeline, Prompt
from docqueue.workers.pipelines.prompts import Templates

PIPELINE_NAME = "openai-batch"
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
MAX_REQUESTS = 50_000  # OpenAI's per-batch limits
MAX_FILE_BYTES = 200 * 1024 * 1024
# Generation fields sent to the endpoint as they are; the endpoint checks their values.
PASSED_PARAMS = frozenset(
    {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user"}
)
_HANDLED = {
    CHAT_URL: frozenset(
        {"messages", "max_tokens", "max_completion_tokens", "response_format", "stop", "n"}
    ),
    COMPLETIONS_URL: frozenset({"prompt", "max_tokens", "stop", "n", "best_of"}),
}
# Fields that change nothing here: the job's model answers, and replies are never streamed.
_IGNORED = frozenset({"model", "stream", "metadata", "store"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class BatchFileError(InputError):
    """The batch file as a whole cannot be used (missing, empty, over OpenAI's limits)."""


class JobNotFinishedError(WorkerError):
    """The job is still running: its result files would not yet account for every request."""


class _BadLine(Exception):
    """Internal: one line cannot run. `status` 400 for a body problem, None for the line."""

    def __init__(
        self, code: str, problem: str, *, status: int | None = None, param: str | None = None
    ) -> None:
        super().__init__(problem)
        self.code, self.problem, self.status, self.param = code, problem, status, param


def _invalid(problem: str, param: str | None, code: str = "invalid_value") -> _BadLine:
    return _BadLine(code, problem, status=400, param=param)


# -- reading -------------------------------------------------------------------------------------


def read_batch_file(path: str | os.PathLike[str], *, max_bytes: int) -> Iterator[SourceDocument]:
    """One document per non-blank line of an OpenAI Batch input file, in order.

    The file is checked before this returns; the lines are read as the iterator is consumed,
    and a bad line becomes a document whose `error` names the line and the problem.

    Raises:
        BatchFileError: the file is missing, unreadable, empty or over OpenAI's limits.
    """
    source = os.fspath(path)
    try:
        size = os.stat(source).st_size
        if not os.path.isfile(source):
            raise BatchFileError(f"{source} is not a regular file")
        if size > MAX_FILE_BYTES:
            raise BatchFileError(
                f"{source} is {size:,} bytes, over OpenAI's batch file limit of "
                f"{MAX_FILE_BYTES:,} bytes (200 MB); split it into several files"
            )
        with open(source, "rb") as stream:
            requests = sum(1 for _, line, _ in bounded_lines(stream, max_bytes) if _used(line))
    except FileNotFoundError:
        raise BatchFileError(f"{source} does not exist") from None
    except OSError as exc:
        raise BatchFileError(f"{source} cannot be read: {exc.strerror or exc}") from None
    if requests == 0:
        raise BatchFileError(f"{source} holds no requests")
    if requests > MAX_REQUESTS:
        raise BatchFileError(
            f"{source} holds {requests:,} requests, over OpenAI's batch limit of "
            f"{MAX_REQUESTS:,}; split it into several files"
        )
    return _documents(source, max_bytes)


def _used(line: bytes | None) -> bool:
    """Whether a line counts as a request (a line over the size limit does: it is reported)."""
    return line is None or bool(line.strip())


def _documents(source: str, max_bytes: int) -> Iterator[SourceDocument]:
    seen: dict[str, int] = {}  # custom_id -> line: at most 50,000 entries
    with open(source, "rb") as stream:
        for number, raw, size in bounded_lines(stream, max_bytes):
            if _used(raw):
                yield _line_document(source, number, raw, size, max_bytes, seen)


def _line_document(
    source: str, number: int, raw: bytes | None, size: int, max_bytes: int, seen: dict[str, int]
) -> SourceDocument:
    label, where = f"{source} line {number}", f"{source}:{number}"
    custom_id: str | None = None
    url: str | None = None
    try:
        if raw is None:
            raise _BadLine(
                "line_too_large", f"is {size:,} bytes, over the limit of {max_bytes:,} bytes"
            )
        line = _decode(raw)
        custom_id = _custom_id(line, number, seen)  # a repeated one is not this line's
        label = f"{label} (custom_id {custom_id!r})"
        url, body = _target(line)
        _prompt_of(url, body)  # the body must make a prompt now, not fail at a worker later
        text = json.dumps({"url": url, "body": body}, sort_keys=True, ensure_ascii=False)
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problem = f"is not valid Unicode (a lone surrogate at character {exc.start:,})"
        return _rejected(where, number, custom_id, url, label, _invalid(problem, None))
    except _BadLine as bad:
        return _rejected(where, number, custom_id, url, label, bad)
    metadata: dict[str, Any] = {"url": url, "line": number, "custom_id": custom_id}
    if isinstance(model := body.get("model"), str):
        metadata["requested_model"] = model
    assert custom_id is not None
    return SourceDocument(
        custom_id, where, text, hashlib.sha256(data).hexdigest(), len(data), metadata
    )


def _rejected(
    where: str, number: int, custom_id: str | None, url: str | None, label: str, bad: _BadLine
) -> SourceDocument:
    metadata = {
        "url": url, "line": number, "custom_id": custom_id,
        "error_code": bad.code, "error_param": bad.param, "http_status": bad.status,
    }
    external_id = custom_id if custom_id is not None else f"line:{number}"
    return SourceDocument(
        external_id, where, None, None, None, metadata, f"{label} {bad.problem}."
    )


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        problem = f"is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start:,})"
        raise _BadLine("invalid_json", problem) from None
    except json.JSONDecodeError as exc:
        raise _BadLine("invalid_json", f"is not valid JSON ({exc.msg}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise _BadLine("invalid_json", f"is not usable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _BadLine(
            "invalid_request",
            f"is {_kind(value)}, not an object with custom_id, method, url and body",
        )
    return value


def _custom_id(line: Mapping[str, Any], number: int, seen: dict[str, int]) -> str:
    """The line's custom_id. A repeated one stays with its first line, so that each custom_id
    names one request in the result files; the repeat's error line has a null custom_id."""
    custom_id = line.get("custom_id")
    if custom_id is None:
        raise _BadLine("missing_custom_id", "has no custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        what = "an empty string" if custom_id == "" else _kind(custom_id)
        raise _BadLine("invalid_custom_id", f"has a custom_id that is {what}, not a string")
    if len(custom_id) > MAX_ID_CHARS or "\x00" in custom_id:
        raise _BadLine(
            "invalid_custom_id",
            f"has a custom_id of {len(custom_id):,} characters that cannot be stored "
            f"(at most {MAX_ID_CHARS:,}, no NUL)",
        )
    if (first := seen.get(custom_id)) is not None:
        raise _BadLine(
            "duplicate_custom_id",
            f"repeats the custom_id {custom_id!r} of line {first}; custom_id must be unique",
        )
    seen[custom_id] = number
    return custom_id


def _target(line: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    method, url, body = line.get("method"), line.get("url"), line.get("body")
    if method != "POST":
        raise _BadLine("invalid_method", f"has method {json.dumps(method)}; it must be \"POST\"")
    if url not in _HANDLED:
        raise _BadLine(
            "invalid_url",
            f"has url {json.dumps(url)}; docqueue runs {CHAT_URL} and {COMPLETIONS_URL}",
        )
    if not isinstance(body, dict):
        raise _BadLine("invalid_body", f"has a body that is {_kind(body)}, not an object")
    return url, body


# -- a request body as a prompt ------------------------------------------------------------------


def _prompt_of(url: str, body: Mapping[str, Any]) -> Prompt:
    """The Prompt that sends `body` to the endpoint at `url` (checked at read time).

    Raises:
        _BadLine: the body asks for something docqueue cannot send or return.
    """
    for key in body:
        if key not in _HANDLED[url] and key not in _IGNORED and key not in PASSED_PARAMS:
            raise _invalid(
                f"has a body field {key!r} that docqueue does not support for {url}",
                key, "unsupported_parameter",
            )
    if body.get("stream") not in (None, False):
        raise _invalid("asks for streaming; a batch request must not stream", "stream",
                       "unsupported_value")
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise _invalid(f"asks for {key}={body[key]!r}; only one choice per request is "
                           "supported", key, "unsupported_value")
    params = {k: v for k, v in body.items() if k in PASSED_PARAMS}
    common: dict[str, Any] = {
        "stop": _stop(body.get("stop")),
        "max_tokens": _max_tokens(body),
        "params": params or None,
    }
    if url == CHAT_URL:
        return Prompt(messages=_messages(body.get("messages")),
                      response_format=_response_format(body.get("response_format")), **common)
    return Prompt(text=_prompt_text(body.get("prompt")), **common)


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise _invalid("has a chat body without 'messages'", "messages",
                       "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        what = "an empty array" if messages == [] else _kind(messages)
        raise _invalid(f"has 'messages' that is {what}, not a list of messages", "messages",
                       "invalid_type")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"has {where} that is {_kind(message)}, not an object", where,
                           "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise _invalid(f"has {where} with role {json.dumps(role)}; supported roles: "
                           f"{', '.join(_ROLES)}", f"{where}.role")
        out.append({"role": _ROLES[role], "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _invalid(f"has {where}.content that is {_kind(content)}, not a string or a list "
                       "of text parts", f"{where}.content", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
            part.get("text"), str
        ):
            kind = part.get("type") if isinstance(part, dict) else None
            shown = f"a part of type {kind!r}" if isinstance(kind, str) else _kind(part)
            raise _invalid(f"has {where}.content[{j}] that is {shown}; only text parts are "
                           "supported", f"{where}.content[{j}]", "unsupported_value")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a list of one prompt is that prompt
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise _invalid("has a completion body without a 'prompt'", "prompt",
                       "missing_required_parameter")
    what = "a list of several prompts" if isinstance(prompt, list) else _kind(prompt)
    raise _invalid(f"has a 'prompt' that is {what}; each request must hold one string prompt",
                   "prompt", "unsupported_value")


def _stop(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("has a 'stop' that is not a string or a list of strings", "stop",
                       "invalid_type")
    return stops or None


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _invalid(f"has {key}={value!r}; it must be a positive integer", key)
        return value
    return None


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _invalid("has a 'response_format' that is not an object with a 'type'",
                       "response_format", "invalid_type")
    return value


# -- the pipeline ---------------------------------------------------------------------------


class OpenAIBatchPipeline(Pipeline):
    """Each document is one request: sent as it is, its reply stored as it is."""

    name = PIPELINE_NAME
    chunked = False
    VERSION = "openai-batch-r1"

    def __init__(self, options: Mapping[str, Any]) -> None:
        if options:
            raise PipelineError(f"{self.name}: it takes no options, got {', '.join(options)}")
        super().__init__({}, Templates("", "", "", ()))
        self.version = self.VERSION  # the request itself is the prompt: no template to hash

    def render(self, text: str, mode: Mode, level: int = 0) -> Prompt:
        """The request stored as `text`; its url, not the job's mode, picks the endpoint.
        (No reduce: each request is its own document, so `level` is always 0.)"""
        request = json.loads(text)
        try:
            return _prompt_of(request["url"], request["body"])
        except _BadLine as bad:  # read_batch_file checked it, so the store was edited
            raise PipelineError(f"{self.name}: the stored request {bad.problem}") from None

    def parse(self, raw: str, finish_reason: str | None) -> dict[str, Any]:
        return {"content": raw, "finish_reason": finish_reason}

    def _parse(self, raw: str) -> Any:
        return raw

    def merge(self, outputs: Sequence[Any]) -> Any:
        return outputs[0] if outputs else None


# -- writing OpenAI's output and error files ----------------------------------------------------


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


def write_batch_results(
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


# workers/provider/client.py words a provider's error as "HTTP <status> <code>: <message>"; after retries
# the processor prefixes "gave up after N attempts; last error: ".
_PROVIDER_ERROR = re.compile(r"HTTP \d{3}(?: (?P<code>[\w.-]+))?: (?P<message>.*)", re.DOTALL)
# What workers/provider/client.py says when a call got no HTTP response, and OpenAI-style codes for it.
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
            code = "batch_abandoned" if row.error_type == "BatchAbandoned" else "request_failed"
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


def _kind(value: object) -> str:
    """A JSON name for the type of `value`, with its article."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list) else "an object")
