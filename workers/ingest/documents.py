"""A document read from a source, and the checks every one passes before it is kept.

Guarantees: a `SourceDocument` is either usable (text that is not empty, holds no NUL, encodes
as UTF-8, is within the byte limit, and is hashed) or carries one sentence (`error`) naming the
input and the problem; ids the store cannot keep (too long, not text) are refused here. Nothing
here raises on bad input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_ID_CHARS = 1000  # models.tables.Document.external_id is a String(1000)


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One input document, or why it cannot be read (`error` set, `text` None).

    `size_bytes` is the file's size for a file, the UTF-8 size of the text for a JSONL line or
    a record. `content_hash` is the sha256 hex digest of the UTF-8 text.
    """

    external_id: str
    source: str | None
    text: str | None
    content_hash: str | None
    size_bytes: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def from_json(
    raw: bytes, label: str, fallback_id: str, where: str, max_bytes: int
) -> SourceDocument:
    try:
        value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        problem = f"{label} is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start:,})"
        return failed(fallback_id, where, problem)
    except json.JSONDecodeError as exc:
        return failed(
            fallback_id, where, f"{label} is not valid JSON ({exc.msg}, column {exc.colno})"
        )
    except (ValueError, RecursionError) as exc:
        return failed(fallback_id, where, f"{label} is not usable JSON ({exc})")
    if not isinstance(value, dict):
        problem = f"{label} is {_kind(value)}, not an object with an id and a text"
        return failed(fallback_id, where, problem)
    return from_fields(value, label, fallback_id, where, max_bytes)


def from_fields(
    fields: Mapping[str, Any], label: str, fallback_id: str, where: str | None, max_bytes: int
) -> SourceDocument:
    """A document from the `id`, `text` and `metadata` of a JSONL object or a record."""
    given, text, metadata = fields.get("id"), fields.get("text"), fields.get("metadata")
    external_id = fallback_id
    if isinstance(given, str) and given:
        external_id = given
    elif isinstance(given, int) and not isinstance(given, bool):
        external_id = str(given)
    elif given is not None:
        problem = "an empty 'id'" if given == "" else f"an 'id' that is {_kind(given)}"
        return failed(fallback_id, where, f"{label} has {problem}, not a string")
    if text is None:
        return failed(external_id, where, f"{label} has no 'text'")
    if not isinstance(text, str):
        return failed(
            external_id, where, f"{label} has a 'text' that is {_kind(text)}, not a string"
        )
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, Mapping):
        problem = f"{label} has a 'metadata' that is {_kind(metadata)}, not an object"
        return failed(external_id, where, problem)
    else:
        metadata = dict(metadata)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            return failed(external_id, where, f"{label} has a 'metadata' that is not JSON ({exc})")
    return document(external_id, where, text, None, metadata, max_bytes, label)


def document(
    external_id: str,
    source: str | None,
    text: str,
    size_bytes: int | None,
    metadata: dict[str, Any],
    max_bytes: int,
    label: str | None = None,
) -> SourceDocument:
    """Check the text of a document that was read and hash it."""
    label = label or source or external_id
    if not text.strip():
        problem = f"{label} is empty" if not text else f"{label} holds only whitespace"
        return failed(external_id, source, problem, size_bytes)
    if (nul := text.find("\x00")) >= 0:
        problem = f"{label} holds a NUL character (at character {nul:,}), so it is not text"
        return failed(external_id, source, problem, size_bytes)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problem = f"{label} is not valid Unicode (a lone surrogate at character {exc.start:,})"
        return failed(external_id, source, problem, size_bytes)
    if len(data) > max_bytes:
        return failed(external_id, source, over_limit(label, len(data), max_bytes), len(data))
    size = len(data) if size_bytes is None else size_bytes
    return SourceDocument(
        external_id, source, text, hashlib.sha256(data).hexdigest(), size, metadata
    )


def failed(
    external_id: str, source: str | None, problem: str, size_bytes: int | None = None
) -> SourceDocument:
    """A document that cannot be used; `problem` becomes its error sentence."""
    return SourceDocument(external_id, source, None, None, size_bytes, {}, problem + ".")


def printable(text: str) -> str:
    """`text` with lone surrogates (undecodable bytes of a file name) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def id_problem(external_id: str) -> str | None:
    """Why the store could not keep this id, if it could not."""
    if len(external_id) > MAX_ID_CHARS:
        return f"has an id of {len(external_id):,} characters, over the limit of {MAX_ID_CHARS:,}"
    if "\x00" in external_id or printable(external_id) != external_id:
        return "has an id that is not valid text (a NUL character or a lone surrogate)"
    return None


def over_limit(label: str, size: int, limit: int) -> str:
    return f"{label} is {size:,} bytes, over the limit of {limit:,} bytes"


def _kind(value: object) -> str:
    """A JSON-ish name for the type of `value`, with its article."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list | tuple) else "an object")
