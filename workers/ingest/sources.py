"""Reading document sources as a stream of `SourceDocument`s, with one clear error per bad input.

`iter_documents(inputs, max_bytes=...)` is the one entry point. Each item of `inputs` is either
a path (str or os.PathLike: a file, a directory, or a glob such as `docs/**/*.md`) or an
in-memory record (an `(id, text)` pair, or a mapping with `id`, `text` and optional `metadata`),
so paths, records or a mix of both stream through the same call; a lone path may be passed as is.

Ids: a given id wins. A file under a directory argument is named by its path relative to that
directory (POSIX separators); a file or glob match by its path as given, normalized; a JSONL line
without an id by `<file id>:<line number>`; a mapping without an id by `record:<n>`.

Directories (and globs) are walked in sorted order, skipping hidden entries and not following
links to directories. Every file found is reported: one with an unsupported extension becomes an
error, not a silent omission. Nothing raises out of the iterator: unreadable input becomes a
document whose `error` names the input and the problem, and the stream goes on. Memory stays
flat: one file at a time, JSONL line by line with a bounded buffer, and the only state that grows
is the table of ids seen (an 8-byte digest and an 8-byte locator per id).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import PurePath
from typing import IO, Any

import bs4
import pypdf

from docqueue.workers.ingest.archives import (
    BoundedGunzip,
    gunzip_document,
    gzip_inner_suffix,
    zip_members,
)
from docqueue.workers.ingest.decoding import Rejected as _Rejected
from docqueue.workers.ingest.decoding import binary_problem, decode_text
from docqueue.workers.ingest.office import docx_text

SUPPORTED_SUFFIXES = (".docx", ".gz", ".htm", ".html", ".jsonl", ".md", ".pdf", ".txt", ".zip")
# What a .gz or a zip member may hold (archives do not nest).
_DOCUMENT_SUFFIXES = (".docx", ".htm", ".html", ".md", ".pdf", ".txt")
MAX_ID_CHARS = 1000  # models.tables.Document.external_id is a String(1000)
_SNIFF_BYTES = 8192  # a NUL byte this early marks a binary file
_GLOB_MAGIC = frozenset("*?[")
# pypdf logs its complaints about a broken file ("EOF marker not found"); with no handler of
# its own they reached the terminal beside the document's error. They belong in the log only.
logging.getLogger("pypdf").addHandler(logging.NullHandler())


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


Input = str | os.PathLike[str] | tuple[Any, ...] | Mapping[str, Any]


def iter_documents(
    inputs: Iterable[Input] | str | os.PathLike[str], *, max_bytes: int
) -> Iterator[SourceDocument]:
    """Stream the documents of `inputs` in order (see the module docstring)."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    yield from _Stream(max_bytes).documents(inputs)


# -- the stream and its ids ---------------------------------------------------------------------

# Where an id was first used, packed in 64 bits: kind, index, position.
_AS_ID, _UNDER_ROOT, _LINE, _RECORD = range(4)


def _locator(kind: int, index: int = 0, position: int = 0) -> int:
    return kind << 62 | (index & 0x3FFFFFFF) << 32 | (position & 0xFFFFFFFF)


class _SeenIds:
    """Ids met so far: 64-bit digests in an open-addressing table (16 bytes a slot, at most two
    thirds full), each with the locator of its first use. A digest collision, about one chance
    in 10^7 with a million ids, would reject a document as a duplicate."""

    def __init__(self) -> None:
        self._keys = array("Q", bytes(8 * 1024))
        self._where = array("Q", bytes(8 * 1024))
        self._size = 0

    def add(self, external_id: str, where: int) -> int | None:
        """Record `external_id` as used at `where`; if it was used before, return that locator."""
        digest = hashlib.blake2b(external_id.encode("utf-8", "surrogatepass"), digest_size=8)
        key = int.from_bytes(digest.digest(), "little") or 1  # 0 marks an empty slot
        slot = _probe(self._keys, key)
        if self._keys[slot] == key:
            return self._where[slot]
        self._keys[slot], self._where[slot] = key, where
        self._size += 1
        if 3 * self._size > 2 * len(self._keys):
            keys, wheres = self._keys, self._where
            self._keys = array("Q", bytes(16 * len(keys)))
            self._where = array("Q", bytes(16 * len(keys)))
            for old_key, old_where in zip(keys, wheres, strict=True):
                if old_key:
                    slot = _probe(self._keys, old_key)
                    self._keys[slot], self._where[slot] = old_key, old_where
        return None


def _probe(keys: array[int], key: int) -> int:
    """The slot that holds `key`, or the empty slot where it belongs."""
    mask = len(keys) - 1
    slot = key & mask
    while keys[slot] and keys[slot] != key:
        slot = (slot + 1) & mask
    return slot


class _Stream:
    """One pass over the inputs: the byte limit, the ids seen, and how to name a first use."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._seen = _SeenIds()
        self._roots: list[str] = []  # directory arguments, to name a file first seen under one
        self._jsonl: list[str] = []  # JSONL files read, to name a line first seen in one
        self._records = 0

    def documents(self, inputs: Iterable[Input]) -> Iterator[SourceDocument]:
        for number, item in enumerate(inputs, 1):
            if isinstance(item, str | os.PathLike):
                found = self._path(os.fspath(item))
            elif isinstance(item, tuple | Mapping):
                found = iter([self._record(item)])
            else:
                kind = type(item).__name__
                article = "an" if kind[0] in "aeiou" else "a"
                problem = f"Input #{number} is {article} {kind}, not a path or a record"
                found = iter([(_failed(f"input:{number}", None, problem), _locator(_RECORD))])
            for doc, where in found:
                yield self._checked(doc, where)

    def _checked(self, doc: SourceDocument, where: int) -> SourceDocument:
        """Reject an id that is too long or already used (the first use keeps it)."""
        label = doc.source or f"Record #{where & 0xFFFFFFFF}"
        if problem := _id_problem(doc.external_id):
            storable = _printable(doc.external_id[:MAX_ID_CHARS]).replace("\x00", "\ufffd")
            doc = _failed(storable, doc.source, f"{label} {problem}")
        first = self._seen.add(doc.external_id, where)
        if first is not None:
            holder = self._describe(first, doc.external_id)
            problem = f"{label} repeats the id {doc.external_id!r}, already used by {holder}"
            doc = _failed(doc.external_id, doc.source, problem)
        return doc

    def _describe(self, where: int, external_id: str) -> str:
        kind, index, position = where >> 62, where >> 32 & 0x3FFFFFFF, where & 0xFFFFFFFF
        if kind == _RECORD:
            return f"record #{position}"
        if kind == _LINE:
            return f"{self._jsonl[index]} line {position}"
        if kind == _UNDER_ROOT:
            return _normalized(os.path.join(self._roots[index], external_id))
        return external_id

    # -- paths ----------------------------------------------------------------------------------

    def _path(self, given: str) -> Iterator[tuple[SourceDocument, int]]:
        path = _normalized(given)
        where = _locator(_AS_ID)
        if os.path.isdir(given):
            self._roots.append(given)
            where = _locator(_UNDER_ROOT, len(self._roots) - 1)
            files = _walk(given, "", None)
        elif os.path.lexists(given) or not _GLOB_MAGIC.intersection(given):
            files = iter([(given, path, None)])
        else:
            files = _glob(given)
        empty = True
        for file, external_id, problem in files:
            empty = False
            if problem is not None:
                yield _failed(external_id, _normalized(file), problem), where
                continue
            for doc, line_where in self._file(file, external_id):
                yield doc, where if line_where is None else line_where
        if empty:
            nothing = "holds no files" if os.path.isdir(given) else "matches no file"
            yield _failed(path, path, f"{path} {nothing} (hidden ones are skipped)"), where

    def _file(self, path: str, external_id: str) -> Iterator[tuple[SourceDocument, int | None]]:
        """The document of one file, or those of its lines with their locators for JSONL."""
        source = _normalized(path)
        try:
            info = os.stat(path)
        except OSError as exc:
            yield _failed(external_id, source, _unreadable(source, exc)), None
            return
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        try:
            suffix = _readable_suffix(source, info, self.max_bytes)
            with open(path, "rb") as stream:
                if suffix == ".zip":
                    yield from self._zip(stream, source, external_id, info.st_size)
                    return
                if suffix == ".gz":
                    yield from self._gzip(stream, source, external_id, info.st_size)
                    return
                if suffix == ".jsonl":
                    yield from self._jsonl_lines(stream, source, external_id)
                    return
                text, metadata = _read(stream, source, suffix, self.max_bytes)
            yield _document(external_id, source, text, size, metadata, self.max_bytes), None
        except _Rejected as exc:
            yield _failed(external_id, source, str(exc), size), None
        except OSError as exc:
            yield _failed(external_id, source, _unreadable(source, exc), size), None

    def _gzip(
        self, stream: IO[bytes], source: str, external_id: str, compressed_bytes: int
    ) -> Iterator[tuple[SourceDocument, int | None]]:
        """A gzip'd document, or a gzip'd JSONL stream (see workers/ingest/archives.py)."""
        inner = gzip_inner_suffix(source)
        if inner == ".jsonl":
            lines = BoundedGunzip(stream, source, compressed_bytes)
            yield from self._jsonl_lines(lines, source, external_id)  # type: ignore[arg-type]
            return
        if inner not in _DOCUMENT_SUFFIXES:
            kind = f"a {inner!r} file" if inner else "a file without an extension"
            raise _Rejected(f"{source} is {kind} compressed with gzip; it may hold one of "
                            f"{', '.join((*_DOCUMENT_SUFFIXES, '.jsonl'))}")
        data = gunzip_document(stream, source, self.max_bytes)
        text, metadata = _read(io.BytesIO(data), source, inner, self.max_bytes)
        metadata["compression"] = "gzip"
        yield _document(external_id, source, text, len(data), metadata, self.max_bytes), None

    def _zip(
        self, stream: IO[bytes], source: str, file_id: str, archive_bytes: int
    ) -> Iterator[tuple[SourceDocument, int | None]]:
        """One document per member, named `<zip id>:<member path>`; a bad member is an error of
        its own and the others are still read."""
        for member in zip_members(stream, source, archive_bytes, self.max_bytes,
                                  _DOCUMENT_SUFFIXES):
            member_id = _printable(f"{file_id}:{member.name}")
            member_source = _printable(f"{source}:{member.name}")
            if member.data is None:
                yield _failed(member_id, member_source, str(member.problem)), None
                continue
            try:
                text, metadata = _read(io.BytesIO(member.data), member_source, member.suffix,
                                       self.max_bytes)
            except _Rejected as exc:
                yield _failed(member_id, member_source, str(exc), len(member.data)), None
                continue
            metadata["archive"] = source
            yield _document(member_id, member_source, text, len(member.data), metadata,
                            self.max_bytes), None

    def _jsonl_lines(
        self, stream: IO[bytes], source: str, file_id: str
    ) -> Iterator[tuple[SourceDocument, int | None]]:
        """One document per line, read with a bounded buffer: a huge line is never held whole."""
        if problem := _binary(stream.read(_SNIFF_BYTES)):
            raise _Rejected(f"{source} {problem}")
        stream.seek(0)
        self._jsonl.append(source)
        index, empty = len(self._jsonl) - 1, True
        for number, line, size in _lines(stream, self.max_bytes):
            label, line_id = f"{source} line {number}", f"{file_id}:{number}"
            where = f"{source}:{number}"
            if line is None:
                doc = _failed(line_id, where, _over_limit(label, size, self.max_bytes), size)
            elif line.strip():
                doc = _from_json(line, label, line_id, where, self.max_bytes)
            else:
                continue  # a blank line is no document
            empty = False
            yield doc, _locator(_LINE, index, number)
        if empty:
            raise _Rejected(f"{source} is empty: it holds no JSON lines")

    # -- records --------------------------------------------------------------------------------

    def _record(self, item: tuple[Any, ...] | Mapping[str, Any]) -> tuple[SourceDocument, int]:
        self._records += 1
        label, where = f"Record #{self._records}", _locator(_RECORD, 0, self._records)
        fallback_id = f"record:{self._records}"
        if isinstance(item, tuple):
            if len(item) != 2:
                problem = f"{label} is a tuple of {len(item)} items, not (id, text)"
                return _failed(fallback_id, None, problem), where
            item = {"id": item[0], "text": item[1]}
        if isinstance(given := item.get("id"), str | int) and given != "":
            label = f"{label} (id {given!r})"
        return _from_fields(item, label, fallback_id, None, self.max_bytes), where


# -- walking directories and globs -------------------------------------------------------------


def _walk(directory: str, prefix: str, depth: int | None) -> Iterator[tuple[str, str, str | None]]:
    """(path, relative id, problem) for every file below `directory`, in sorted order."""
    try:
        with os.scandir(directory) as entries:
            names = sorted(
                (entry.name, entry.is_dir(follow_symlinks=False))
                for entry in entries
                if not entry.name.startswith(".")
            )
    except OSError as exc:
        problem = f"{_normalized(directory)} cannot be listed: {_reason(exc)}"
        yield directory, prefix.rstrip("/") or ".", problem
        return
    for name, is_dir in names:
        path = os.path.join(directory, name)
        if not is_dir:
            yield path, _printable(prefix + name), None
        elif depth is None or depth > 1:
            yield from _walk(path, f"{prefix}{name}/", None if depth is None else depth - 1)


def _glob(pattern: str) -> Iterator[tuple[str, str, str | None]]:
    """(path, id, problem) for every file that matches `pattern` (`**` spans directories)."""
    parts = PurePath(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.intersection(part))
    base, rest = os.path.join(".", *parts[:fixed]), parts[fixed:]
    if not os.path.isdir(base):
        return
    depth = None if "**" in rest else len(rest)
    for path, relative, problem in _walk(base, "", depth):
        if problem is not None or _matches(rest, relative.split("/")):
            yield path, _normalized(path), problem


def _matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


# -- formats ----------------------------------------------------------------------------------


def _read(
    stream: IO[bytes], source: str, suffix: str, max_bytes: int
) -> tuple[str, dict[str, Any]]:
    """The text and metadata of one non-JSONL file."""
    if suffix == ".pdf":
        return _pdf_text(stream, source, max_bytes)
    if suffix == ".docx":
        return docx_text(stream, source, max_bytes)
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after it was measured
        raise _Rejected(_over_limit(source, len(data), max_bytes))
    if not data:
        raise _Rejected(f"{source} is empty")
    text, encoding = decode_text(data, source)  # UTF-8, a BOM's, or a detected legacy one
    if suffix in (".html", ".htm"):
        text, metadata = _html_text(text)
    else:
        metadata = {"format": suffix[1:]}
    return text, {**metadata, **encoding}


_BLOCK_TAGS = [
    *("address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog"),
    *("div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr"),
    *("h1", "h2", "h3", "h4", "h5", "h6", "li", "main", "nav", "ol", "p", "pre", "section"),
    *("summary", "table", "tbody", "tfoot", "thead", "tr", "ul"),
]
_PARAGRAPH, _LINE_BREAK = "\ue000", "\ue001"  # private-use marks, replaced before returning


def _html_text(markup: str) -> tuple[str, dict[str, Any]]:
    """Visible text, one paragraph per block element, whitespace collapsed as a browser does."""
    soup = bs4.BeautifulSoup(markup, "html.parser")
    title = " ".join(soup.title.get_text().split()) if soup.title else ""
    for tag in soup(["head", "script", "style", "noscript", "template", "title"]):
        tag.decompose()
    for tag in soup("pre"):
        for string in tag.find_all(string=True):
            string.replace_with(string.replace("\n", _LINE_BREAK))
    for tag in soup("br"):
        tag.replace_with(_LINE_BREAK)
    for tag in soup(["td", "th"]):
        tag.append(" ")
    for tag in soup(_BLOCK_TAGS):
        tag.insert_before(_PARAGRAPH)
        tag.append(_PARAGRAPH)
    paragraphs = []
    for block in soup.get_text().split(_PARAGRAPH):
        lines = (" ".join(line.split()) for line in block.split(_LINE_BREAK))
        if paragraph := "\n".join(line for line in lines if line):
            paragraphs.append(paragraph)
    metadata: dict[str, Any] = {"format": "html"}
    if title:
        metadata["title"] = title
    return "\n\n".join(paragraphs), metadata


def _pdf_text(stream: IO[bytes], source: str, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """The text of every page, pages separated by a blank line."""
    try:
        reader = pypdf.PdfReader(stream)
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Rejected(f"{source} is an encrypted PDF and needs a password")
        pages: list[str] = []
        size = 0
        for page in reader.pages:
            if text := (page.extract_text() or "").strip():
                pages.append(text)
                size += len(text)  # characters: never more than the UTF-8 bytes
                if size > max_bytes:
                    raise _Rejected(f"{source} holds more than {max_bytes:,} bytes of text")
        title = reader.metadata.title if reader.metadata else None
        count = len(reader.pages)
    except (_Rejected, MemoryError):
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else "no detail"
        raise _Rejected(
            f"{source} is not a readable PDF ({type(exc).__name__}: {detail})"
        ) from None
    if not pages:
        raise _Rejected(f"{source} has no extractable text (a scanned PDF needs OCR first)")
    metadata: dict[str, Any] = {"format": "pdf", "pages": count}
    if title:
        metadata["title"] = str(title)
    return "\n\n".join(pages), metadata


def _lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(number, line or None when over `max_bytes`, size without the line end) for each line."""
    limit = max_bytes + 2  # room for the content and a CRLF
    number = 0
    while raw := stream.readline(limit):
        number += 1
        size, tail = len(raw), raw
        if len(raw) == limit and not raw.endswith(b"\n"):  # too long: skip the rest unread
            while tail and not tail.endswith(b"\n"):
                tail = stream.readline(1 << 20)
                size += len(tail)
        size -= 2 if tail.endswith(b"\r\n") else 1 if tail.endswith(b"\n") else 0
        yield number, (raw if size <= max_bytes else None), size


def _from_json(
    raw: bytes, label: str, fallback_id: str, where: str, max_bytes: int
) -> SourceDocument:
    try:
        value = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as exc:
        problem = f"{label} is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start:,})"
        return _failed(fallback_id, where, problem)
    except json.JSONDecodeError as exc:
        return _failed(
            fallback_id, where, f"{label} is not valid JSON ({exc.msg}, column {exc.colno})"
        )
    except (ValueError, RecursionError) as exc:
        return _failed(fallback_id, where, f"{label} is not usable JSON ({exc})")
    if not isinstance(value, dict):
        problem = f"{label} is {_kind(value)}, not an object with an id and a text"
        return _failed(fallback_id, where, problem)
    return _from_fields(value, label, fallback_id, where, max_bytes)


def _from_fields(
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
        return _failed(fallback_id, where, f"{label} has {problem}, not a string")
    if text is None:
        return _failed(external_id, where, f"{label} has no 'text'")
    if not isinstance(text, str):
        return _failed(
            external_id, where, f"{label} has a 'text' that is {_kind(text)}, not a string"
        )
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, Mapping):
        problem = f"{label} has a 'metadata' that is {_kind(metadata)}, not an object"
        return _failed(external_id, where, problem)
    else:
        metadata = dict(metadata)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as exc:
            return _failed(external_id, where, f"{label} has a 'metadata' that is not JSON ({exc})")
    return _document(external_id, where, text, None, metadata, max_bytes, label)


def _document(
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
        return _failed(external_id, source, problem, size_bytes)
    if (nul := text.find("\x00")) >= 0:
        problem = f"{label} holds a NUL character (at character {nul:,}), so it is not text"
        return _failed(external_id, source, problem, size_bytes)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problem = f"{label} is not valid Unicode (a lone surrogate at character {exc.start:,})"
        return _failed(external_id, source, problem, size_bytes)
    if len(data) > max_bytes:
        return _failed(external_id, source, _over_limit(label, len(data), max_bytes), len(data))
    size = len(data) if size_bytes is None else size_bytes
    return SourceDocument(
        external_id, source, text, hashlib.sha256(data).hexdigest(), size, metadata
    )


# -- small helpers ----------------------------------------------------------------------------


def _failed(
    external_id: str, source: str | None, problem: str, size_bytes: int | None = None
) -> SourceDocument:
    """A document that cannot be used; `problem` becomes its error sentence."""
    return SourceDocument(external_id, source, None, None, size_bytes, {}, problem + ".")


def _normalized(path: str) -> str:
    return _printable(PurePath(os.path.normpath(path)).as_posix())


def _printable(text: str) -> str:
    """`text` with lone surrogates (undecodable bytes of a file name) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _id_problem(external_id: str) -> str | None:
    """Why the store could not keep this id, if it could not."""
    if len(external_id) > MAX_ID_CHARS:
        return f"has an id of {len(external_id):,} characters, over the limit of {MAX_ID_CHARS:,}"
    if "\x00" in external_id or _printable(external_id) != external_id:
        return "has an id that is not valid text (a NUL character or a lone surrogate)"
    return None


def _binary(head: bytes) -> str | None:
    return binary_problem(head)


def _over_limit(label: str, size: int, limit: int) -> str:
    return f"{label} is {size:,} bytes, over the limit of {limit:,} bytes"


def _unreadable(source: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{source} does not exist"
    return f"{source} cannot be read: {_reason(exc)}"


def _readable_suffix(source: str, info: os.stat_result, max_bytes: int) -> str:
    """The file's lower-case suffix, once it is known to be a file docqueue can read."""
    suffix = PurePath(source).suffix.lower()
    if stat.S_ISDIR(info.st_mode):
        raise _Rejected(f"{source} is a link to a directory; such links are not followed")
    if not stat.S_ISREG(info.st_mode):
        raise _Rejected(f"{source} is not a regular file")
    if suffix not in SUPPORTED_SUFFIXES:
        kind = f"the extension {suffix!r}" if suffix else "no extension"
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise _Rejected(f"{source} has {kind}; the supported ones are {supported}")
    # JSONL is limited line by line, a zip member by member, and a .gz by what it holds once
    # decompressed (workers/ingest/archives.py).
    if suffix not in (".jsonl", ".zip", ".gz") and info.st_size > max_bytes:
        raise _Rejected(_over_limit(source, info.st_size, max_bytes))
    return suffix


def _reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or type(exc).__name__).lower()


def _kind(value: object) -> str:
    """A JSON-ish name for the type of `value`, with its article."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list | tuple) else "an object")
