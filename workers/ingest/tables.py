"""Reading tables as documents: one row is one document, its id the user's, its metadata the
other columns.

`read_tables(sources, spec, max_bytes=...)` takes Parquet, CSV, TSV and JSONL files, a
`pyarrow.Table` or an iterable of mappings. It opens every table before it returns: a file that
is not the format its name says, or a named column that is missing, raises `InputError` (one
line naming the input and, for a column, the columns that exist) before anything is recorded.
The rows then stream: Parquet by row group in record batches, CSV and JSONL line by line, so
memory holds one batch of rows and the ids seen (a 64-bit digest each).

A row whose text is null, empty or not text, whose id is missing or already used in the job,
becomes a document with an `error` that names the table and the row number (1 for the first
row below a header); the other rows go on.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import json
import math
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from pathlib import PurePath
from typing import Any

from docqueue.workers.errors import InputError
from docqueue.workers.ingest.decoding import binary_problem
from docqueue.workers.ingest.documents import MAX_ID_CHARS, SourceDocument

# Files read as tables whether or not a text column is named; a .jsonl only with one.
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_ID_COLUMN = "id"  # used when the table has it and no id column is named
BATCH_ROWS = 2048  # rows per Parquet record batch and per Arrow table slice
_SNIFF_BYTES = 8192


@dataclass(frozen=True, slots=True)
class TableSpec:
    """Which columns hold the text, the id and the metadata (None: every other column)."""

    text: str = DEFAULT_TEXT_COLUMN
    id: str | None = None
    metadata: tuple[str, ...] | None = None


def is_table(source: Any) -> bool:
    """True for a `pyarrow.Table` or a path whose name says Parquet, CSV or TSV."""
    if isinstance(source, str | os.PathLike):
        return PurePath(os.fspath(source)).suffix.lower() in TABLE_SUFFIXES
    return type(source).__name__ == "Table" and type(source).__module__.startswith("pyarrow")


def read_tables(sources: Any, spec: TableSpec, *, max_bytes: int) -> Iterator[SourceDocument]:
    """Open every table of `sources` now, and return the stream of their rows as documents.

    Raises:
        InputError: a table cannot be opened as its format, or lacks a named column.
    """
    tables: list[_Table] = []
    try:
        for source in _split(sources):
            tables.append(_open(source, spec))
    except BaseException:
        for table in tables:
            table.close()
        raise
    return _Rows(spec, max_bytes).documents(tables)


def _split(sources: Any) -> list[Any]:
    """The tables given: a path, a pyarrow Table, paths, or one iterable of mappings."""
    if isinstance(sources, str | os.PathLike) or is_table(sources):
        return [sources]
    items = iter(sources)
    first = next(items, None)
    if first is None:
        raise InputError("the table holds no rows")
    if isinstance(first, Mapping):
        return [chain([first], items)]
    return [first, *items]


@dataclass
class _Table:
    """An opened table: its name for messages, its columns, and its rows in batches."""

    name: str
    columns: list[str]
    batches: Iterator[list[dict[str, Any]]]
    close: Callable[[], None] = lambda: None  # the file, should the rows never be read


def _open(source: Any, spec: TableSpec) -> _Table:
    if isinstance(source, str | os.PathLike):
        table = _open_file(os.fspath(source))
    elif is_table(source):
        table = _Table("the table", list(source.column_names), _arrow_batches(source))
    elif isinstance(source, Iterator):
        table = _mapping_rows(source)
    else:
        kind = type(source).__name__
        raise InputError(f"a table input is a {kind}: give a path, a pyarrow.Table or mappings")
    try:
        _check_columns(table, spec)
    except InputError:
        table.close()
        raise
    return table


def _open_file(path: str) -> _Table:
    name = PurePath(os.path.normpath(path)).as_posix()
    suffix = PurePath(path).suffix.lower()
    if not os.path.isfile(path):
        problem = "does not exist" if not os.path.exists(path) else "is not a regular file"
        raise InputError(f"{name} {problem}")
    if suffix == ".parquet":
        return _parquet(path, name)
    if suffix in (".csv", ".tsv"):
        return _delimited(path, name, "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return _jsonl(path, name)
    kind = f"the extension {suffix!r}" if suffix else "no extension"
    raise InputError(f"{name} has {kind}; a table is .parquet, .csv, .tsv or .jsonl")


def _check_columns(table: _Table, spec: TableSpec) -> None:
    wanted = [spec.text, *([spec.id] if spec.id else []), *(spec.metadata or ())]
    for column in wanted:
        if column not in table.columns:
            have = ", ".join(table.columns) or "none"
            raise InputError(f"{table.name} has no column {column!r}; its columns are: {have}")


# -- formats ----------------------------------------------------------------------------------


def _parquet(path: str, name: str) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{name} is not a readable Parquet file ({_first_line(exc)})") from None

    def batches() -> Iterator[list[dict[str, Any]]]:
        with file:
            # One thread: the parallel column readers held about 10 MiB more for no gain here.
            for batch in file.iter_batches(batch_size=BATCH_ROWS, use_threads=False):
                yield batch.to_pylist()

    return _Table(name, list(file.schema_arrow.names), batches(), file.close)


def _arrow_batches(table: Any) -> Iterator[list[dict[str, Any]]]:
    for batch in table.to_batches(max_chunksize=BATCH_ROWS):
        yield batch.to_pylist()


def _delimited(path: str, name: str, delimiter: str) -> _Table:
    kind = "TSV" if delimiter == "\t" else "CSV"
    with open(path, "rb") as raw:
        head = raw.read(_SNIFF_BYTES)
    if problem := binary_problem(head):
        raise InputError(f"{name} is not a {kind} file: it {problem}")
    stream = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 (closed by the rows)
    reader = csv.reader(stream, delimiter=delimiter)
    try:
        header = next(reader, None)
    except (UnicodeDecodeError, csv.Error) as exc:
        stream.close()
        raise InputError(f"{name} is not a readable {kind} file ({_first_line(exc)})") from None
    if not header:
        stream.close()
        raise InputError(f"{name} is empty: a {kind} file needs a header row")

    def batches() -> Iterator[list[dict[str, Any]]]:
        with stream:
            row = 0
            try:
                for row, fields in enumerate(reader, 1):  # noqa: B007 (row: after the loop)
                    if len(fields) != len(header):
                        if fields:  # a blank line is no row
                            yield [{_BAD_ROW: f"has {len(fields)} fields, the header "
                                               f"{len(header)}"}]
                        continue
                    yield [dict(zip(header, fields, strict=True))]
            except (UnicodeDecodeError, csv.Error) as exc:
                yield [{_BAD_ROW: f"cannot be read ({_first_line(exc)}); the rest of "
                                  f"{name} is skipped"}]

    _allow_fields_up_to(2**31 - 1)
    return _Table(name, header, batches(), stream.close)


def _jsonl(path: str, name: str) -> _Table:
    stream = open(path, "rb")  # noqa: SIM115 (closed by the rows)
    if problem := binary_problem(stream.read(_SNIFF_BYTES)):
        stream.close()
        raise InputError(f"{name} is not JSON Lines: it {problem}")
    stream.seek(0)
    lines = (line for line in stream if line.strip())
    first = next(lines, None)
    try:
        record = json.loads(first) if first is not None else None
    except (ValueError, RecursionError) as exc:
        stream.close()
        raise InputError(f"{name} is not JSON Lines: its first line is not JSON ({exc})") from None
    if not isinstance(record, dict):
        stream.close()
        what = "holds no lines" if first is None else "does not hold a JSON object"
        raise InputError(f"{name} is not a table of JSON objects: its first line {what}")

    def batches() -> Iterator[list[dict[str, Any]]]:
        with stream:
            yield [record]
            for line in lines:
                try:
                    value = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    value = {_BAD_ROW: f"is not valid JSON ({_first_line(exc)})"}
                if not isinstance(value, dict):
                    value = {_BAD_ROW: "is not a JSON object"}
                yield [value]

    return _Table(name, list(record), batches(), stream.close)


def _mapping_rows(rows: Iterator[Any]) -> _Table:
    first = next(rows)
    columns = list(first)

    def batches() -> Iterator[list[dict[str, Any]]]:
        for row in chain([first], rows):
            yield [dict(row)] if isinstance(row, Mapping) else [{_BAD_ROW: "is not a mapping"}]

    return _Table("the rows", columns, batches())


_BAD_ROW = "\x00docq-bad-row"  # a row that could not be read: the value says why


def _allow_fields_up_to(chars: int) -> None:
    """Lift the csv module's field limit (128 KiB): the document limit applies instead."""
    if csv.field_size_limit() < chars:
        csv.field_size_limit(chars)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


# -- rows to documents --------------------------------------------------------------------------


class _Digests:
    """A set of 64-bit digests in one open-addressing array: 8 bytes a slot, at most half full,
    so 10^6 ids take 16 MiB where a Python set of ints took about 70. A digest collision (about
    one chance in 10^7 with 10^6 ids) would reject a row as a repeat."""

    def __init__(self) -> None:
        self._slots = array("Q", bytes(8 * 1024))
        self._size = 0

    def add(self, key: int) -> bool:
        """Add `key` (non-zero); False if it was there already."""
        slots, mask = self._slots, len(self._slots) - 1
        slot = key & mask
        while slots[slot]:
            if slots[slot] == key:
                return False
            slot = (slot + 1) & mask
        slots[slot] = key
        self._size += 1
        if 2 * self._size > len(slots):
            self._grow()
        return True

    def _grow(self) -> None:
        old, self._slots = self._slots, array("Q", bytes(16 * len(self._slots)))
        mask = len(self._slots) - 1
        for key in old:
            if key:
                slot = key & mask
                while self._slots[slot]:
                    slot = (slot + 1) & mask
                self._slots[slot] = key


class _Rows:
    """One pass over the tables of a submit: the ids seen, shared by all of them."""

    def __init__(self, spec: TableSpec, max_bytes: int) -> None:
        self.spec, self.max_bytes = spec, max_bytes
        self._seen = _Digests()

    def documents(self, tables: list[_Table]) -> Iterator[SourceDocument]:
        for table in tables:
            id_column = self.spec.id or (DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in table.columns
                                         else None)
            taken = {self.spec.text, id_column}
            metadata = list(self.spec.metadata) if self.spec.metadata is not None else [
                c for c in table.columns if c not in taken]
            number = 0
            for batch in table.batches:
                for row in batch:
                    number += 1
                    yield self._document(table.name, number, row, id_column, metadata)

    def _document(self, name: str, number: int, row: dict[str, Any], id_column: str | None,
                  metadata: list[str]) -> SourceDocument:
        where, label = f"{name}:{number}", f"{name} row {number:,}"
        if (bad := row.get(_BAD_ROW)) is not None:
            return _failed(where, where, f"{label} {bad}")
        external_id, problem = where, None
        if id_column is not None:
            given, problem = _id_of(row.get(id_column), id_column)
            external_id = given or where
        if problem is None:
            problem = self._repeated(external_id)
        if problem is None:
            problem = _text_problem(row.get(self.spec.text), self.spec.text, self.max_bytes)
        if problem is not None:
            return _failed(external_id, where, f"{label} {problem}")
        text = row[self.spec.text]
        data = text.encode("utf-8")
        meta = {column: _jsonable(row.get(column)) for column in metadata}
        return SourceDocument(external_id, where, text, hashlib.sha256(data).hexdigest(),
                              len(data), meta)

    def _repeated(self, external_id: str) -> str | None:
        digest = hashlib.blake2b(external_id.encode("utf-8"), digest_size=8).digest()
        if not self._seen.add(int.from_bytes(digest, "little") or 1):  # 0 marks an empty slot
            return f"repeats the id {external_id!r} of an earlier row"
        return None


def _id_of(value: Any, column: str) -> tuple[str | None, str | None]:
    """(the id as text, None) or (None, why the row has no usable id)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, f"has no id (its {column!r} is empty)"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a nullable integer column read as floats
    if isinstance(value, bool) or not isinstance(value, str | int | float | decimal.Decimal):
        return None, f"has an id that is {_kind(value)}, not a string or a number"
    text = str(value)
    if len(text) > MAX_ID_CHARS:
        return None, f"has an id of {len(text):,} characters, over the limit of {MAX_ID_CHARS:,}"
    if "\x00" in text:
        return None, "has an id with a NUL character"
    return text, None


def _text_problem(text: Any, column: str, max_bytes: int) -> str | None:
    if text is None:
        return f"has no text (its {column!r} is null)"
    if not isinstance(text, str):
        return f"has a {column!r} that is {_kind(text)}, not text"
    if not text.strip():
        return f"has no text (its {column!r} is empty)"
    if "\x00" in text:
        return f"has a NUL character in its {column!r}, so it is not text"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return f"has a {column!r} that is not valid Unicode (a lone surrogate)"
    if size > max_bytes:
        return f"has a {column!r} of {size:,} bytes, over the limit of {max_bytes:,} bytes"
    return None


def _jsonable(value: Any) -> Any:
    """A metadata value as JSON can hold it: dates as ISO text, NaN as null, bytes as hex."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_jsonable(v) for v in value]
    return str(value)


def _failed(external_id: str, source: str, problem: str) -> SourceDocument:
    return SourceDocument(external_id, source, None, None, None, {}, problem + ".")


def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "a list" if isinstance(value, list | tuple) else "an object")
