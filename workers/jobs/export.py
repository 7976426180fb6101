"""Tables out: a job's results as Parquet, CSV or Arrow, one flat row per document (or chunk).

A row is keyed by the document's id (the user's, for a table that went in), carries its
metadata as columns, the output flattened where it is an object (a scalar field is a column of
its own, a nested one a column of JSON text), and status, error and usage columns.

Written in a stream: the rows are read from the store twice, in batches of `READ_ROWS`, once to
learn the columns and their types (a table's schema must be known before its first row) and
once to write them `WRITE_ROWS` at a time, so memory holds one batch whatever the job's size.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from docqueue.models import Chunk, Document, Job, Result

READ_ROWS = 1_000
WRITE_ROWS = 10_000
FORMATS = ("parquet", "csv")
_DOCUMENT_TAIL = ("status", "error", "chunks", "tokens_in", "tokens_out", "cost")
_CHUNK_HEAD = ("id", "chunk", "char_start", "char_end", "tokens")
_CHUNK_TAIL = ("status", "error", "tokens_in", "tokens_out")
_RESERVED = frozenset({"id", *_DOCUMENT_TAIL, *_CHUNK_HEAD, *_CHUNK_TAIL})

Row = dict[str, Any]


def document_rows(session: Session, job_id: int) -> Iterator[Row]:
    """One flat row per document of the job, in submission order."""
    query = (select(Document.external_id, Document.meta, Document.output, Document.status,
                    Document.error, Document.chunk_count, Document.tokens_in,
                    Document.tokens_out, Document.cost)
             .where(Document.job_id == job_id).order_by(Document.id)
             .execution_options(yield_per=READ_ROWS))
    for d in session.execute(query):
        row: Row = {"id": d.external_id}
        _spread(row, d.meta or {}, d.output)
        row.update(status=d.status, error=d.error, chunks=d.chunk_count,
                   tokens_in=d.tokens_in, tokens_out=d.tokens_out, cost=d.cost)
        yield row


def chunk_rows(session: Session, job_id: int) -> Iterator[Row]:
    """One flat row per chunk (level 0) of the job: each part's own answer, before any merge."""
    version = session.scalar(select(Job.pipeline_version).where(Job.id == job_id))
    query = (select(Document.external_id, Document.meta, Chunk.seq, Chunk.char_start,
                    Chunk.char_end, Chunk.token_count, Result.status, Result.output,
                    Result.error_message, Result.tokens_in, Result.tokens_out)
             .join(Document, Document.id == Chunk.document_id)
             .outerjoin(Result, and_(Result.chunk_id == Chunk.id,
                                     Result.pipeline_version == version))
             .where(Chunk.job_id == job_id, Chunk.level == 0)
             .order_by(Chunk.document_id, Chunk.seq)
             .execution_options(yield_per=READ_ROWS))
    for r in session.execute(query):
        row: Row = {"id": r.external_id, "chunk": r.seq, "char_start": r.char_start,
                    "char_end": r.char_end, "tokens": r.token_count}
        _spread(row, r.meta or {}, r.output)
        status = r.status if r.status and r.status != "retry" else "pending"
        row.update(status=status, error=r.error_message, tokens_in=r.tokens_in or 0,
                   tokens_out=r.tokens_out or 0)
        yield row


def _spread(row: Row, metadata: dict[str, Any], output: Any) -> None:
    """Metadata and output as columns: a name the row already uses gets a prefix."""
    for key, value in metadata.items():
        row[f"meta_{key}" if key in _RESERVED else key] = value
    if not isinstance(output, dict):
        row["output"] = output
        return
    for key, value in output.items():
        row[f"output_{key}" if key in _RESERVED or key in metadata else key] = value


# -- columns and their types ----------------------------------------------------------------------

_KINDS = ("bool", "int", "float", "text")


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "text"  # a string, or anything else written as JSON text


@dataclass
class Columns:
    """The columns rows use, in the order first met, each with the one type all its values fit."""

    kinds: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterator[Row]) -> Columns:
        columns = cls()
        for row in rows:
            columns.add(row)
        return columns

    def add(self, row: Row) -> None:
        for name, value in row.items():
            kind, known = _kind(value), self.kinds.get(name)
            if name not in self.kinds or known is None:
                self.kinds[name] = kind
            elif kind is not None and kind != known:
                self.kinds[name] = "float" if {kind, known} == {"int", "float"} else "text"

    def arrow_schema(self) -> Any:
        import pyarrow as pa

        types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "text": pa.string(),
                 None: pa.string()}
        return pa.schema([(name, types[kind]) for name, kind in self.kinds.items()])

    def cell(self, name: str, value: Any) -> Any:
        """`value` as the column's type holds it."""
        if value is None:
            return None
        kind = self.kinds[name]
        if kind == "float":
            return float(value)
        if kind in ("text", None) and not isinstance(value, str):
            return json.dumps(value, ensure_ascii=False)
        return value


# -- writers ------------------------------------------------------------------------------------


def arrow_batches(rows: Iterator[Row], columns: Columns) -> Iterator[Any]:
    """`pyarrow.RecordBatch`es of `WRITE_ROWS` rows, of the columns' schema."""
    import pyarrow as pa

    schema = columns.arrow_schema()
    names = list(columns.kinds)
    pending: list[Row] = []

    def batch() -> Any:
        data = {n: [columns.cell(n, row.get(n)) for row in pending] for n in names}
        return pa.RecordBatch.from_pydict(data, schema=schema)

    for row in rows:
        pending.append(row)
        if len(pending) >= WRITE_ROWS:
            yield batch()
            pending = []
    if pending or not names:
        yield batch()


def write_parquet(rows: Iterator[Row], columns: Columns, path: str) -> int:
    """Write `rows` to a Parquet file at `path`; returns the rows written."""
    import pyarrow.parquet as pq

    written = 0
    with pq.ParquetWriter(path, columns.arrow_schema()) as writer:
        for batch in arrow_batches(rows, columns):
            writer.write_batch(batch)
            written += batch.num_rows
    return written


def write_csv(rows: Iterator[Row], columns: Columns, out: IO[str]) -> int:
    """Write `rows` as CSV with a header to `out`; an empty cell is a null."""
    names = list(columns.kinds)
    writer = csv.writer(out)
    writer.writerow(names)
    written = 0
    for row in rows:
        writer.writerow(["" if (v := columns.cell(n, row.get(n))) is None else
                         ("true" if v is True else "false" if v is False else v) for n in names])
        written += 1
    return written


RowSource = Callable[[], Iterator[Row]]
