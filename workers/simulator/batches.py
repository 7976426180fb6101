"""OpenAI's Batch API: `/v1/files` (upload, retrieve, content) and `/v1/batches` (create,
retrieve, list, cancel).

A batch's replies are the online endpoint's: each line's body goes through the same `parse`
and `build_reply`, so its choices and usage equal what `/v1/chat/completions` answers for that
body. The lines are worked out once, in a thread, when the batch is created; after that the
batch's state is a function of the clock. Lines are done in file order, evenly over
`turnaround_s`; a batch whose `window_s` ends first expires with the lines done by then, and a
cancel keeps the lines done before it. A batch whose lines are all done is read `finalizing`
once, then `completed` (as a cancelled one is read `cancelling` once). A terminal batch gets
OpenAI's files: the output file
holds the lines answered 200, the error file the others and, for an expired or cancelled
batch, the lines never run (`batch_expired` / `batch_cancelled`, no response).

Failed lines are drawn per batch and line, so the same line sent again in a new batch may
pass. A batch whose prompt tokens would take its model's unfinished batches past
`enqueued_token_limit` fails at once with OpenAI's `token_limit_exceeded` error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from docqueue.workers.simulator.config import SimulatorConfig
from docqueue.workers.simulator.generate import build_reply
from docqueue.workers.simulator.protocol import ApiError, Endpoint, parse

ENDPOINTS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
COMPLETION_WINDOW = "24h"
MAX_METADATA_PAIRS = 16
LIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
KeyCheck = Callable[[web.Request, "str | None"], None]


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True)
class Line:
    """One input line's outcome: a response (status, body) or a line-level error."""

    custom_id: str | None
    status: int | None
    body: dict[str, Any] | None
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Batch:
    id: str
    number: int
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created_at: float
    total: int
    model: str | None
    prompt_tokens: int
    turnaround_s: float
    window_s: float
    lines: list[Line] | None = None  # None while the lines are worked out ("validating")
    errors: list[dict[str, Any]] | None = None  # set when the batch failed validation
    cancelling_at: float | None = None
    cancel_seen: bool = False
    finalizing_seen: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None
    closed: bool = False

    def done_by(self, at_s: float) -> int:
        """Lines done by time `at_s`."""
        if self.turnaround_s <= 0:
            return self.total
        share = max(0.0, at_s - self.created_at) / self.turnaround_s
        return min(self.total, int(self.total * share))

    @property
    def ends_at(self) -> float:
        return self.created_at + self.turnaround_s

    @property
    def expires_at(self) -> float:
        return self.created_at + self.window_s

    def status(self, now: float) -> str:
        if self.errors is not None:
            return "failed"
        if self.lines is None:
            return "validating"
        if self.cancelling_at is not None:
            return "cancelled" if self.cancel_seen else "cancelling"
        if self.expires_at < self.ends_at and now >= self.expires_at:
            return "expired"
        if now < self.ends_at:
            return "in_progress"
        return "completed" if self.finalizing_seen else "finalizing"

    def stopped_at(self, status: str) -> float:
        """When the lines stopped being run, for a terminal status."""
        if status == "cancelled" and self.cancelling_at is not None:
            return self.cancelling_at
        return self.expires_at if status == "expired" else self.ends_at


@dataclass
class BatchService:
    config: SimulatorConfig
    check_key: KeyCheck
    files: dict[str, StoredFile] = field(default_factory=dict)
    batches: dict[str, Batch] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: {"files_uploaded": 0, "batches_created": 0, "batches_cancelled": 0}
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def new_file(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        digest = _digest(f"file:{len(self.files)}:{filename}")
        stored = StoredFile(f"file-{digest}", filename, purpose, content, int(time.time()))
        self.files[stored.id] = stored
        return stored

    def enqueued_tokens(self, model: str | None, now: float) -> int:
        return sum(
            b.prompt_tokens
            for b in self.batches.values()
            if b.model == model and b.status(now) in LIVE
        )


SERVICE = web.AppKey("batch_service", BatchService)


def add_routes(app: web.Application, config: SimulatorConfig, check_key: KeyCheck) -> None:
    """Serve the Batch API on `app`; `check_key` is the server's API-key check."""
    app[SERVICE] = BatchService(config, check_key)
    app.router.add_post("/v1/files", _upload)
    app.router.add_get("/v1/files/{file_id}", _file)
    app.router.add_get("/v1/files/{file_id}/content", _file_content)
    app.router.add_post("/v1/batches", _create)
    app.router.add_get("/v1/batches", _list)
    app.router.add_get("/v1/batches/{batch_id}", _retrieve)
    app.router.add_post("/v1/batches/{batch_id}/cancel", _cancel)
    app.router.add_get("/stats/batches", _stats)


def _service(request: web.Request) -> BatchService:
    service = request.app[SERVICE]
    service.check_key(request, service.config.api_key)
    return service


async def _upload(request: web.Request) -> web.Response:
    service = _service(request)
    limit = service.config.batch.max_file_bytes
    purpose, filename, content = None, "upload.jsonl", b""
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.read()).decode("utf-8", "replace")
        elif part.name == "file":
            filename = part.filename or filename
            content = await _read_part(part, limit)
    if purpose != "batch":
        raise ApiError(
            400,
            f"'purpose' must be 'batch' on this simulator, got {purpose!r}",
            param="purpose",
            code="invalid_value",
        )
    if not content.strip():
        raise ApiError(400, "The uploaded file is empty.", param="file", code="invalid_value")
    lines = sum(1 for line in content.splitlines() if line.strip())
    if lines > service.config.batch.max_requests:
        raise ApiError(
            400,
            f"The file has {lines} requests; a batch file may have at most "
            f"{service.config.batch.max_requests}.",
            param="file",
            code="invalid_value",
        )
    stored = service.new_file(filename, "batch", content)
    service.counts["files_uploaded"] += 1
    return web.json_response(stored.entry())


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise ApiError(
                400,
                f"The file is larger than {limit} bytes, the most a batch file may have.",
                param="file",
                code="file_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _stored_file(service: BatchService, file_id: str) -> StoredFile:
    stored = service.files.get(file_id)
    if stored is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id", code="not_found")
    return stored


async def _file(request: web.Request) -> web.Response:
    service = _service(request)
    return web.json_response(_stored_file(service, request.match_info["file_id"]).entry())


async def _file_content(request: web.Request) -> web.Response:
    service = _service(request)
    stored = _stored_file(service, request.match_info["file_id"])
    return web.Response(body=stored.content, content_type="application/octet-stream")


async def _create(request: web.Request) -> web.Response:
    service = _service(request)
    body = await _json_body(request)
    file_id = _field(body, "input_file_id")
    endpoint = _field(body, "endpoint")
    if endpoint not in ENDPOINTS:
        raise ApiError(
            400,
            f"'endpoint' must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}",
            param="endpoint",
            code="invalid_value",
        )
    if _field(body, "completion_window") != COMPLETION_WINDOW:
        raise ApiError(
            400,
            f"'completion_window' must be '{COMPLETION_WINDOW}'",
            param="completion_window",
            code="invalid_value",
        )
    metadata = _metadata(body.get("metadata"))
    stored = service.files.get(file_id)
    if stored is None or stored.purpose != "batch":
        raise ApiError(
            400, f"Cannot find file {file_id}.", param="input_file_id", code="invalid_value"
        )
    batch = _new_batch(service, stored, endpoint, metadata)
    service.counts["batches_created"] += 1
    return web.json_response(_entry(service, batch, time.time()))


def _new_batch(
    service: BatchService, stored: StoredFile, endpoint: str, metadata: dict[str, str] | None
) -> Batch:
    config = service.config.batch
    raw_lines = [line for line in stored.content.splitlines() if line.strip()]
    number = len(service.batches)
    batch = Batch(
        id=f"batch_{_digest(f'batch:{number}')}",
        number=number,
        input_file_id=stored.id,
        endpoint=endpoint,
        metadata=metadata,
        created_at=time.time(),
        total=len(raw_lines),
        model=None,
        prompt_tokens=0,
        turnaround_s=config.turnaround_s,
        window_s=config.window_s,
    )
    service.batches[batch.id] = batch
    task = asyncio.get_running_loop().create_task(_work_out(service, batch, raw_lines))
    service.tasks.add(task)
    task.add_done_callback(service.tasks.discard)
    return batch


async def _work_out(service: BatchService, batch: Batch, raw_lines: list[bytes]) -> None:
    """Compute every line's outcome off the event loop, then admit the batch or fail it."""
    lines, model, tokens = await asyncio.to_thread(_run_lines, service.config, batch, raw_lines)
    limit = service.config.batch.enqueued_token_limit
    batch.model = model
    if limit is not None and service.enqueued_tokens(model, time.time()) + tokens > limit:
        batch.errors = [_token_limit_error(model, limit)]
        return
    batch.prompt_tokens = tokens
    batch.lines = lines
    # Time runs from when the lines were ready: the work of a big file is not a head start.
    batch.created_at = time.time()


def _run_lines(
    config: SimulatorConfig, batch: Batch, raw_lines: list[bytes]
) -> tuple[list[Line], str | None, int]:
    kind = ENDPOINTS[batch.endpoint]
    lines: list[Line] = []
    models: dict[str, int] = {}
    tokens = 0
    created = int(time.time())
    for index, raw in enumerate(raw_lines):
        line, model, prompt_tokens = _run_line(config, batch, kind, index, raw, created)
        lines.append(line)
        if model is not None:
            models[model] = models.get(model, 0) + 1
        tokens += prompt_tokens
    model = max(models, key=lambda m: models[m]) if models else None
    return lines, model, tokens


def _run_line(
    config: SimulatorConfig, batch: Batch, kind: Endpoint, index: int, raw: bytes, created: int
) -> tuple[Line, str | None, int]:
    try:
        item = json.loads(raw)
    except ValueError:
        return Line(None, None, None, _line_error("invalid_json_line", index)), None, 0
    custom_id = item.get("custom_id") if isinstance(item, dict) else None
    if not isinstance(custom_id, str) or item.get("method") != "POST":
        return Line(None, None, None, _line_error("invalid_request", index)), None, 0
    if item.get("url") != batch.endpoint:
        error = {"code": "mismatched_endpoint", "message": f"line {index + 1}: 'url' must be "
                 f"{batch.endpoint}, the batch's endpoint"}
        return Line(custom_id, None, None, error), None, 0
    try:
        req = parse(item.get("body"), kind)
        if req.model not in config.models:
            raise ApiError(404, f"The model '{req.model}' does not exist.", param="model",
                           code="model_not_found")
        reply = build_reply(req, config, created)
    except ApiError as exc:
        return Line(custom_id, exc.status, exc.body()), None, 0
    if _fails(batch, custom_id, config.batch.fail_rate):
        body = ApiError(500, "The server had an error while processing your request.",
                        type="server_error").body()
        return Line(custom_id, 500, body), req.model, req.total_prompt_tokens
    return Line(custom_id, 200, reply.body), req.model, req.total_prompt_tokens


def _fails(batch: Batch, custom_id: str, rate: float) -> bool:
    return rate > 0 and random.Random(f"{batch.number}:{custom_id}").random() < rate


def _line_error(code: str, index: int) -> dict[str, str]:
    return {"code": code, "message": f"line {index + 1}: not a request object with a string "
            "custom_id, method POST, url and body"}


def _token_limit_error(model: str | None, limit: int) -> dict[str, Any]:
    return {
        "code": "token_limit_exceeded",
        "message": f"Enqueued token limit reached for {model} in organization org-docqsim. "
        f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress batches "
        "have been completed.",
        "param": None,
        "line": None,
    }


async def _retrieve(request: web.Request) -> web.Response:
    service = _service(request)
    batch = _batch(service, request.match_info["batch_id"])
    return web.json_response(_entry(service, batch, time.time()))


async def _cancel(request: web.Request) -> web.Response:
    service = _service(request)
    batch = _batch(service, request.match_info["batch_id"])
    now = time.time()
    status = batch.status(now)
    if status not in ("validating", "in_progress", "cancelling"):
        raise ApiError(
            400,
            f"Cannot cancel a batch with status '{status}'.",
            param="batch_id",
            code="invalid_value",
        )
    if batch.cancelling_at is None:
        batch.cancelling_at = now
        service.counts["batches_cancelled"] += 1
    if batch.lines is None:  # cancelled before it started: nothing was run
        batch.lines = []
        batch.total = 0
    entry = _entry(service, batch, now)
    batch.cancel_seen = True  # the next read finds it cancelled
    return web.json_response(entry)


async def _list(request: web.Request) -> web.Response:
    service = _service(request)
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise ApiError(400, "'limit' must be an integer", param="limit") from None
    if not 1 <= limit <= 100:
        raise ApiError(400, "'limit' must be between 1 and 100", param="limit")
    newest_first = sorted(service.batches.values(), key=lambda b: -b.number)
    after = request.query.get("after")
    if after is not None:
        start = _batch(service, after).number
        newest_first = [b for b in newest_first if b.number < start]
    page = newest_first[:limit]
    now = time.time()
    data = [_entry(service, b, now) for b in page]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(newest_first) > limit,
        }
    )


async def _stats(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(dict(service.counts))


def _batch(service: BatchService, batch_id: str) -> Batch:
    batch = service.batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id",
                       code="not_found")
    return batch


def _entry(service: BatchService, batch: Batch, now: float) -> dict[str, Any]:
    """The batch object as OpenAI returns it, with files written once it is terminal."""
    status = batch.status(now)
    if status == "finalizing":
        batch.finalizing_seen = True  # one read finds it finalizing, the next completed
    done = _done_lines(batch, status, now)
    if status in ("completed", "expired", "cancelled") and not batch.closed:
        _close(service, batch, status, done)
    stamp = int(batch.created_at)
    stopped = int(batch.stopped_at(status))
    entry: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_id,
        "completion_window": COMPLETION_WINDOW,
        "status": status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": stamp,
        "in_progress_at": None if batch.lines is None else stamp,
        "expires_at": int(batch.expires_at),
        "finalizing_at": stopped if status in ("finalizing", "completed", "expired") else None,
        "completed_at": stopped if status == "completed" else None,
        "failed_at": stamp if status == "failed" else None,
        "expired_at": stopped if status == "expired" else None,
        "cancelling_at": None if batch.cancelling_at is None else int(batch.cancelling_at),
        "cancelled_at": stopped if status == "cancelled" else None,
        "request_counts": {
            "total": batch.total,
            "completed": sum(1 for line in done if line.ok),
            "failed": sum(1 for line in done if not line.ok),
        },
        "metadata": batch.metadata,
    }
    return entry


def _done_lines(batch: Batch, status: str, now: float) -> list[Line]:
    if batch.lines is None:
        return []
    if status in ("finalizing", "completed", "expired", "cancelled", "cancelling"):
        return batch.lines[: batch.done_by(batch.stopped_at(status))]
    return batch.lines[: batch.done_by(now)]


def _close(service: BatchService, batch: Batch, status: str, done: list[Line]) -> None:
    """Write the output and error files of a batch that just became terminal."""
    assert batch.lines is not None
    output: list[bytes] = []
    errors: list[bytes] = []
    for index, line in enumerate(done):
        record = _output_record(batch, index, line)
        (output if line.ok else errors).append(record)
    code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
    if code is not None:
        message = {
            "batch_expired": "This request could not be executed before the completion "
            "window expired.",
            "batch_cancelled": "This request was not executed because the batch was cancelled.",
        }[code]
        for index in range(len(done), len(batch.lines)):
            line = Line(batch.lines[index].custom_id, None, None, {"code": code,
                                                                    "message": message})
            errors.append(_output_record(batch, index, line))
    if output:
        name = f"{batch.id}_output.jsonl"
        batch.output_file_id = service.new_file(name, "batch_output", b"".join(output)).id
    if errors:
        name = f"{batch.id}_error.jsonl"
        batch.error_file_id = service.new_file(name, "batch_output", b"".join(errors)).id
    batch.closed = True


def _output_record(batch: Batch, index: int, line: Line) -> bytes:
    response = None
    if line.status is not None:
        response = {
            "status_code": line.status,
            "request_id": f"req_{_digest(f'{batch.id}:{index}:request')}",
            "body": line.body,
        }
    record = {
        "id": f"batch_req_{_digest(f'{batch.id}:{index}')}",
        "custom_id": line.custom_id,
        "response": response,
        "error": line.error,
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"missing required parameter: '{name}'", param=name,
                       code="missing_required_parameter")
    return value


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA_PAIRS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        raise ApiError(
            400,
            f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} string pairs",
            param="metadata",
            code="invalid_value",
        )
    return dict(value)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

