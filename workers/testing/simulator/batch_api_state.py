"""The simulator's provider batches and files: their state as a function of the clock.

Guarantees: a provider batch's status is computed from the time asked about, never stored by a
timer: lines are done in file order, evenly over `turnaround_s`; one whose `window_s` ends first
expires with the lines done by then, and a cancel keeps the lines done before it. A batch whose
lines are all done is read `finalizing` once, then `completed` (a cancelled one `cancelling`
once). A terminal batch gets OpenAI's files exactly once: the output file holds the lines
answered 200, the error file the others and, for an expired or cancelled batch, the lines never
run (`batch_expired` / `batch_cancelled`, no response). Ids are digests of counters, so a run
is reproducible.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from docqueue.workers.testing.simulator.config import SimulatorConfig

COMPLETION_WINDOW = "24h"
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
class ProviderBatch:
    """One batch of the simulated Batch API: its lines, once worked out, and its clock."""

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
class BatchApiService:
    config: SimulatorConfig
    check_key: KeyCheck
    files: dict[str, StoredFile] = field(default_factory=dict)
    batches: dict[str, ProviderBatch] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: {"files_uploaded": 0, "batches_created": 0, "batches_cancelled": 0}
    )
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def new_file(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        name = digest(f"file:{len(self.files)}:{filename}")
        stored = StoredFile(f"file-{name}", filename, purpose, content, int(time.time()))
        self.files[stored.id] = stored
        return stored

    def enqueued_tokens(self, model: str | None, now: float) -> int:
        return sum(
            b.prompt_tokens
            for b in self.batches.values()
            if b.model == model and b.status(now) in LIVE
        )


SERVICE = web.AppKey("batch_service", BatchApiService)


def batch_object(service: BatchApiService, batch: ProviderBatch, now: float) -> dict[str, Any]:
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


def _done_lines(batch: ProviderBatch, status: str, now: float) -> list[Line]:
    if batch.lines is None:
        return []
    if status in ("finalizing", "completed", "expired", "cancelled", "cancelling"):
        return batch.lines[: batch.done_by(batch.stopped_at(status))]
    return batch.lines[: batch.done_by(now)]


def _close(service: BatchApiService, batch: ProviderBatch, status: str, done: list[Line]) -> None:
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


def _output_record(batch: ProviderBatch, index: int, line: Line) -> bytes:
    response = None
    if line.status is not None:
        response = {
            "status_code": line.status,
            "request_id": f"req_{digest(f'{batch.id}:{index}:request')}",
            "body": line.body,
        }
    record = {
        "id": f"batch_req_{digest(f'{batch.id}:{index}')}",
        "custom_id": line.custom_id,
        "response": response,
        "error": line.error,
    }
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

