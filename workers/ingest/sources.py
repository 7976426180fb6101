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

The parts: `documents.py` (a document and its checks), `formats.py` (a file's text by its
format), `walking.py` (directories and globs), `seen_ids.py` (the table of ids seen),
`archives.py` and `decoding.py`.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from docqueue.workers.ingest.archives import (
    BoundedGunzip,
    gunzip_document,
    gzip_inner_suffix,
    zip_members,
)
from docqueue.workers.ingest.decoding import Rejected as _Rejected
from docqueue.workers.ingest.decoding import binary_problem
from docqueue.workers.ingest.documents import (
    MAX_ID_CHARS,
    SourceDocument,
    document,
    failed,
    from_fields,
    from_json,
    id_problem,
    over_limit,
    printable,
)
from docqueue.workers.ingest.formats import (
    DOCUMENT_SUFFIXES,
    SNIFF_BYTES,
    bounded_lines,
    read_text,
    readable_suffix,
)
from docqueue.workers.ingest.seen_ids import (
    AS_ID,
    LINE,
    RECORD,
    UNDER_ROOT,
    SeenIds,
    locator,
)
from docqueue.workers.ingest.walking import GLOB_MAGIC, glob, normalized, unreadable, walk

Input = str | os.PathLike[str] | tuple[Any, ...] | Mapping[str, Any]


def iter_documents(
    inputs: Iterable[Input] | str | os.PathLike[str], *, max_bytes: int
) -> Iterator[SourceDocument]:
    """Stream the documents of `inputs` in order (see the module docstring)."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    yield from _Stream(max_bytes).documents(inputs)


class _Stream:
    """One pass over the inputs: the byte limit, the ids seen, and how to name a first use."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._seen = SeenIds()
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
                found = iter([(failed(f"input:{number}", None, problem), locator(RECORD))])
            for doc, where in found:
                yield self._checked(doc, where)

    def _checked(self, doc: SourceDocument, where: int) -> SourceDocument:
        """Reject an id that is too long or already used (the first use keeps it)."""
        label = doc.source or f"Record #{where & 0xFFFFFFFF}"
        if problem := id_problem(doc.external_id):
            storable = printable(doc.external_id[:MAX_ID_CHARS]).replace("\x00", "\ufffd")
            doc = failed(storable, doc.source, f"{label} {problem}")
        first = self._seen.add(doc.external_id, where)
        if first is not None:
            holder = self._describe(first, doc.external_id)
            problem = f"{label} repeats the id {doc.external_id!r}, already used by {holder}"
            doc = failed(doc.external_id, doc.source, problem)
        return doc

    def _describe(self, where: int, external_id: str) -> str:
        kind, index, position = where >> 62, where >> 32 & 0x3FFFFFFF, where & 0xFFFFFFFF
        if kind == RECORD:
            return f"record #{position}"
        if kind == LINE:
            return f"{self._jsonl[index]} line {position}"
        if kind == UNDER_ROOT:
            return normalized(os.path.join(self._roots[index], external_id))
        return external_id

    # -- paths ----------------------------------------------------------------------------------

    def _path(self, given: str) -> Iterator[tuple[SourceDocument, int]]:
        path = normalized(given)
        where = locator(AS_ID)
        if os.path.isdir(given):
            self._roots.append(given)
            where = locator(UNDER_ROOT, len(self._roots) - 1)
            files = walk(given, "", None)
        elif os.path.lexists(given) or not GLOB_MAGIC.intersection(given):
            files = iter([(given, path, None)])
        else:
            files = glob(given)
        empty = True
        for file, external_id, problem in files:
            empty = False
            if problem is not None:
                yield failed(external_id, normalized(file), problem), where
                continue
            for doc, line_where in self._file(file, external_id):
                yield doc, where if line_where is None else line_where
        if empty:
            nothing = "holds no files" if os.path.isdir(given) else "matches no file"
            yield failed(path, path, f"{path} {nothing} (hidden ones are skipped)"), where

    def _file(self, path: str, external_id: str) -> Iterator[tuple[SourceDocument, int | None]]:
        """The document of one file, or those of its lines with their locators for JSONL."""
        source = normalized(path)
        try:
            info = os.stat(path)
        except OSError as exc:
            yield failed(external_id, source, unreadable(source, exc)), None
            return
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        try:
            suffix = readable_suffix(source, info, self.max_bytes)
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
                text, metadata = read_text(stream, source, suffix, self.max_bytes)
            yield document(external_id, source, text, size, metadata, self.max_bytes), None
        except _Rejected as exc:
            yield failed(external_id, source, str(exc), size), None
        except OSError as exc:
            yield failed(external_id, source, unreadable(source, exc), size), None

    def _gzip(
        self, stream: IO[bytes], source: str, external_id: str, compressed_bytes: int
    ) -> Iterator[tuple[SourceDocument, int | None]]:
        """A gzip'd document, or a gzip'd JSONL stream (see workers/ingest/archives.py)."""
        inner = gzip_inner_suffix(source)
        if inner == ".jsonl":
            lines = BoundedGunzip(stream, source, compressed_bytes)
            yield from self._jsonl_lines(lines, source, external_id)  # type: ignore[arg-type]
            return
        if inner not in DOCUMENT_SUFFIXES:
            kind = f"a {inner!r} file" if inner else "a file without an extension"
            raise _Rejected(f"{source} is {kind} compressed with gzip; it may hold one of "
                            f"{', '.join((*DOCUMENT_SUFFIXES, '.jsonl'))}")
        data = gunzip_document(stream, source, self.max_bytes)
        text, metadata = read_text(io.BytesIO(data), source, inner, self.max_bytes)
        metadata["compression"] = "gzip"
        yield document(external_id, source, text, len(data), metadata, self.max_bytes), None

    def _zip(
        self, stream: IO[bytes], source: str, file_id: str, archive_bytes: int
    ) -> Iterator[tuple[SourceDocument, int | None]]:
        """One document per member, named `<zip id>:<member path>`; a bad member is an error of
        its own and the others are still read."""
        for member in zip_members(stream, source, archive_bytes, self.max_bytes,
                                  DOCUMENT_SUFFIXES):
            member_id = printable(f"{file_id}:{member.name}")
            member_source = printable(f"{source}:{member.name}")
            if member.data is None:
                yield failed(member_id, member_source, str(member.problem)), None
                continue
            try:
                text, metadata = read_text(io.BytesIO(member.data), member_source, member.suffix,
                                       self.max_bytes)
            except _Rejected as exc:
                yield failed(member_id, member_source, str(exc), len(member.data)), None
                continue
            metadata["archive"] = source
            yield document(member_id, member_source, text, len(member.data), metadata,
                            self.max_bytes), None

    def _jsonl_lines(
        self, stream: IO[bytes], source: str, file_id: str
    ) -> Iterator[tuple[SourceDocument, int | None]]:
        """One document per line, read with a bounded buffer: a huge line is never held whole."""
        if problem := binary_problem(stream.read(SNIFF_BYTES)):
            raise _Rejected(f"{source} {problem}")
        stream.seek(0)
        self._jsonl.append(source)
        index, empty = len(self._jsonl) - 1, True
        for number, line, size in bounded_lines(stream, self.max_bytes):
            label, line_id = f"{source} line {number}", f"{file_id}:{number}"
            where = f"{source}:{number}"
            if line is None:
                doc = failed(line_id, where, over_limit(label, size, self.max_bytes), size)
            elif line.strip():
                doc = from_json(line, label, line_id, where, self.max_bytes)
            else:
                continue  # a blank line is no document
            empty = False
            yield doc, locator(LINE, index, number)
        if empty:
            raise _Rejected(f"{source} is empty: it holds no JSON lines")

    # -- records --------------------------------------------------------------------------------

    def _record(self, item: tuple[Any, ...] | Mapping[str, Any]) -> tuple[SourceDocument, int]:
        self._records += 1
        label, where = f"Record #{self._records}", locator(RECORD, 0, self._records)
        fallback_id = f"record:{self._records}"
        if isinstance(item, tuple):
            if len(item) != 2:
                problem = f"{label} is a tuple of {len(item)} items, not (id, text)"
                return failed(fallback_id, None, problem), where
            item = {"id": item[0], "text": item[1]}
        if isinstance(given := item.get("id"), str | int) and given != "":
            label = f"{label} (id {given!r})"
        return from_fields(item, label, fallback_id, None, self.max_bytes), where
