"""OpenAI's Batch API: `/v1/files` (upload, retrieve, content) and `/v1/batches` (create,
retrieve, list, cancel).

The state of a provider batch and its files is in `batch_api_state.py`, how its lines are worked
out in `batch_api_lines.py`; this module is the HTTP surface: the routes, their checks of the
request, and OpenAI's error bodies.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import BodyPartReader, web

from docqueue.workers.testing.simulator.batch_api_lines import ENDPOINTS, new_provider_batch
from docqueue.workers.testing.simulator.batch_api_state import (
    COMPLETION_WINDOW,
    SERVICE,
    BatchApiService,
    KeyCheck,
    ProviderBatch,
    StoredFile,
    batch_object,
)
from docqueue.workers.testing.simulator.config import SimulatorConfig
from docqueue.workers.testing.simulator.protocol import ApiError

MAX_METADATA_PAIRS = 16


def add_routes(app: web.Application, config: SimulatorConfig, check_key: KeyCheck) -> None:
    """Serve the Batch API on `app`; `check_key` is the server's API-key check."""
    app[SERVICE] = BatchApiService(config, check_key)
    app.router.add_post("/v1/files", _upload)
    app.router.add_get("/v1/files/{file_id}", _file)
    app.router.add_get("/v1/files/{file_id}/content", _file_content)
    app.router.add_post("/v1/batches", _create)
    app.router.add_get("/v1/batches", _list)
    app.router.add_get("/v1/batches/{batch_id}", _retrieve)
    app.router.add_post("/v1/batches/{batch_id}/cancel", _cancel)
    app.router.add_get("/stats/batches", _stats)


def _service(request: web.Request) -> BatchApiService:
    service: BatchApiService = request.app[SERVICE]
    service.check_key(request, service.config.api_key)
    return service


async def _upload(request: web.Request) -> web.Response:
    service = _service(request)
    limit = service.config.batch_api.max_file_bytes
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
    if lines > service.config.batch_api.max_requests:
        raise ApiError(
            400,
            f"The file has {lines} requests; a batch file may have at most "
            f"{service.config.batch_api.max_requests}.",
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


def _stored_file(service: BatchApiService, file_id: str) -> StoredFile:
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
    batch = new_provider_batch(service, stored, endpoint, metadata)
    service.counts["batches_created"] += 1
    return web.json_response(batch_object(service, batch, time.time()))


async def _retrieve(request: web.Request) -> web.Response:
    service = _service(request)
    batch = _provider_batch(service, request.match_info["batch_id"])
    return web.json_response(batch_object(service, batch, time.time()))


async def _cancel(request: web.Request) -> web.Response:
    service = _service(request)
    batch = _provider_batch(service, request.match_info["batch_id"])
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
    entry = batch_object(service, batch, now)
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
        start = _provider_batch(service, after).number
        newest_first = [b for b in newest_first if b.number < start]
    page = newest_first[:limit]
    now = time.time()
    data = [batch_object(service, b, now) for b in page]
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


def _provider_batch(service: BatchApiService, batch_id: str) -> ProviderBatch:
    batch = service.batches.get(batch_id)
    if batch is None:
        raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id",
                       code="not_found")
    return batch


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

