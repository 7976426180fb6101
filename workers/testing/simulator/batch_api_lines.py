"""Working out a provider batch's lines: each one answered as the online endpoint answers it.

Guarantees: a line's body goes through the same `parse` and `build_reply` as
`/v1/chat/completions`, so its choices and usage equal the online answer for that body. Failed
lines are drawn per batch and line, so the same line sent again in a new batch may pass. The
lines are worked out once, in a thread, when the batch is created; a batch whose prompt tokens
would take its model's unfinished batches past `enqueued_token_limit` fails at once with
OpenAI's `token_limit_exceeded` error.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

from docqueue.workers.testing.simulator.batch_api_state import (
    BatchApiService,
    Line,
    ProviderBatch,
    StoredFile,
    digest,
)
from docqueue.workers.testing.simulator.config import SimulatorConfig
from docqueue.workers.testing.simulator.generate import build_reply
from docqueue.workers.testing.simulator.protocol import ApiError, Endpoint, parse

ENDPOINTS: dict[str, Endpoint] = {"/v1/chat/completions": "chat", "/v1/completions": "text"}


def new_provider_batch(
    service: BatchApiService, stored: StoredFile, endpoint: str, metadata: dict[str, str] | None
) -> ProviderBatch:
    config = service.config.batch_api
    raw_lines = [line for line in stored.content.splitlines() if line.strip()]
    number = len(service.batches)
    batch = ProviderBatch(
        id=f"batch_{digest(f'batch:{number}')}",
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


async def _work_out(service: BatchApiService, batch: ProviderBatch, raw_lines: list[bytes]) -> None:
    """Compute every line's outcome off the event loop, then admit the batch or fail it."""
    lines, model, tokens = await asyncio.to_thread(run_lines, service.config, batch, raw_lines)
    limit = service.config.batch_api.enqueued_token_limit
    batch.model = model
    if limit is not None and service.enqueued_tokens(model, time.time()) + tokens > limit:
        batch.errors = [token_limit_error(model, limit)]
        return
    batch.prompt_tokens = tokens
    batch.lines = lines
    # Time runs from when the lines were ready: the work of a big file is not a head start.
    batch.created_at = time.time()


def run_lines(
    config: SimulatorConfig, batch: ProviderBatch, raw_lines: list[bytes]
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
    config: SimulatorConfig, batch: ProviderBatch, kind: Endpoint, index: int, raw: bytes,
    created: int,
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
    if _fails(batch, custom_id, config.batch_api.fail_rate):
        body = ApiError(500, "The server had an error while processing your request.",
                        type="server_error").body()
        return Line(custom_id, 500, body), req.model, req.total_prompt_tokens
    return Line(custom_id, 200, reply.body), req.model, req.total_prompt_tokens


def _fails(batch: ProviderBatch, custom_id: str, rate: float) -> bool:
    return rate > 0 and random.Random(f"{batch.number}:{custom_id}").random() < rate


def _line_error(code: str, index: int) -> dict[str, str]:
    return {"code": code, "message": f"line {index + 1}: not a request object with a string "
            "custom_id, method POST, url and body"}


def token_limit_error(model: str | None, limit: int) -> dict[str, Any]:
    return {
        "code": "token_limit_exceeded",
        "message": f"Enqueued token limit reached for {model} in organization org-docqsim. "
        f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress batches "
        "have been completed.",
        "param": None,
        "line": None,
    }
