"""Reading an OpenAI Batch input file as documents: one per line, the file checked first.

Guarantees: a file over OpenAI's limits (50,000 requests, 200 MB), missing, unreadable or
empty is refused whole with `OpenAIBatchFileError` before anything is stored; every other line
becomes a document, and a line that cannot run becomes a document whose `error` names the line
and the problem. A repeated custom_id stays with its first line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from docqueue.workers.errors import InputError
from docqueue.workers.ingest.documents import MAX_ID_CHARS, SourceDocument
from docqueue.workers.ingest.formats import bounded_lines  # the JSONL reader's
from docqueue.workers.pipelines.openai_batch_requests import (
    CHAT_URL,
    COMPLETIONS_URL,
    HANDLED,
    BadLine,
    invalid,
    kind_of,
    prompt_of,
)

MAX_REQUESTS = 50_000  # OpenAI's per-batch limits
MAX_FILE_BYTES = 200 * 1024 * 1024


class OpenAIBatchFileError(InputError):
    """The batch file as a whole cannot be used (missing, empty, over OpenAI's limits)."""


def read_openai_batch_file(
    path: str | os.PathLike[str], *, max_bytes: int
) -> Iterator[SourceDocument]:
    """One document per non-blank line of an OpenAI Batch input file, in order.

    The file is checked before this returns; the lines are read as the iterator is consumed,
    and a bad line becomes a document whose `error` names the line and the problem.

    Raises:
        OpenAIBatchFileError: the file is missing, unreadable, empty or over OpenAI's limits.
    """
    source = os.fspath(path)
    try:
        size = os.stat(source).st_size
        if not os.path.isfile(source):
            raise OpenAIBatchFileError(f"{source} is not a regular file")
        if size > MAX_FILE_BYTES:
            raise OpenAIBatchFileError(
                f"{source} is {size:,} bytes, over OpenAI's batch file limit of "
                f"{MAX_FILE_BYTES:,} bytes (200 MB); split it into several files"
            )
        with open(source, "rb") as stream:
            requests = sum(1 for _, line, _ in bounded_lines(stream, max_bytes) if _used(line))
    except FileNotFoundError:
        raise OpenAIBatchFileError(f"{source} does not exist") from None
    except OSError as exc:
        raise OpenAIBatchFileError(f"{source} cannot be read: {exc.strerror or exc}") from None
    if requests == 0:
        raise OpenAIBatchFileError(f"{source} holds no requests")
    if requests > MAX_REQUESTS:
        raise OpenAIBatchFileError(
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
            raise BadLine(
                "line_too_large", f"is {size:,} bytes, over the limit of {max_bytes:,} bytes"
            )
        line = _decode(raw)
        custom_id = _custom_id(line, number, seen)  # a repeated one is not this line's
        label = f"{label} (custom_id {custom_id!r})"
        url, body = _target(line)
        prompt_of(url, body)  # the body must make a prompt now, not fail at a worker later
        text = json.dumps({"url": url, "body": body}, sort_keys=True, ensure_ascii=False)
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problem = f"is not valid Unicode (a lone surrogate at character {exc.start:,})"
        return _rejected(where, number, custom_id, url, label, invalid(problem, None))
    except BadLine as bad:
        return _rejected(where, number, custom_id, url, label, bad)
    metadata: dict[str, Any] = {"url": url, "line": number, "custom_id": custom_id}
    if isinstance(model := body.get("model"), str):
        metadata["requested_model"] = model
    assert custom_id is not None
    return SourceDocument(
        custom_id, where, text, hashlib.sha256(data).hexdigest(), len(data), metadata
    )


def _rejected(
    where: str, number: int, custom_id: str | None, url: str | None, label: str, bad: BadLine
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
        raise BadLine("invalid_json", problem) from None
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON ({exc.msg}, column {exc.colno})"
        raise BadLine("invalid_json", problem) from None
    except (ValueError, RecursionError) as exc:
        raise BadLine("invalid_json", f"is not usable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadLine(
            "invalid_request",
            f"is {kind_of(value)}, not an object with custom_id, method, url and body",
        )
    return value


def _custom_id(line: Mapping[str, Any], number: int, seen: dict[str, int]) -> str:
    """The line's custom_id. A repeated one stays with its first line, so that each custom_id
    names one request in the result files; the repeat's error line has a null custom_id."""
    custom_id = line.get("custom_id")
    if custom_id is None:
        raise BadLine("missing_custom_id", "has no custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        what = "an empty string" if custom_id == "" else kind_of(custom_id)
        raise BadLine("invalid_custom_id", f"has a custom_id that is {what}, not a string")
    if len(custom_id) > MAX_ID_CHARS or "\x00" in custom_id:
        raise BadLine(
            "invalid_custom_id",
            f"has a custom_id of {len(custom_id):,} characters that cannot be stored "
            f"(at most {MAX_ID_CHARS:,}, no NUL)",
        )
    if (first := seen.get(custom_id)) is not None:
        raise BadLine(
            "duplicate_custom_id",
            f"repeats the custom_id {custom_id!r} of line {first}; custom_id must be unique",
        )
    seen[custom_id] = number
    return custom_id


def _target(line: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    method, url, body = line.get("method"), line.get("url"), line.get("body")
    if method != "POST":
        raise BadLine("invalid_method", f"has method {json.dumps(method)}; it must be \"POST\"")
    if url not in HANDLED:
        raise BadLine(
            "invalid_url",
            f"has url {json.dumps(url)}; docqueue runs {CHAT_URL} and {COMPLETIONS_URL}",
        )
    if not isinstance(body, dict):
        raise BadLine("invalid_body", f"has a body that is {kind_of(body)}, not an object")
    return url, body

