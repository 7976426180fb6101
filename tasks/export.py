"""A job's results as a table: `docq results --format parquet|csv`, `JobHandle.to_arrow()`.

The reading and writing are in workers/jobs/export.py; this module opens the store's sessions
(one per pass: the columns are learned in the first, the rows written in the second).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from docqueue.models import Job
from docqueue.tasks.failures import service_errors
from docqueue.tasks.runtime import runtime
from docqueue.workers.errors import InputError, JobNotFoundError
from docqueue.workers.jobs.export import (
    FORMATS,
    Columns,
    Row,
    arrow_batches,
    chunk_rows,
    document_rows,
    write_csv,
    write_parquet,
)


def _rows(job_id: int, chunks: bool) -> Iterator[Row]:
    rt = runtime()
    with service_errors(rt.settings), rt.sessions() as session:
        if session.scalar(select(Job.id).where(Job.id == job_id)) is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        yield from (chunk_rows if chunks else document_rows)(session, job_id)


def write_results(job_id: int, fmt: str, output: str | os.PathLike[str] | None, *,
                  chunks: bool = False) -> int:
    """Write the job's results as a `fmt` table to `output` (CSV: stdout when None).

    Returns the rows written.

    Raises:
        InputError: an unknown format, Parquet without a file, or a file that cannot be written.
        JobNotFoundError: no job has this id.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown table format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "parquet" and output is None:
        raise InputError("--format parquet writes a file: give it with --output FILE")
    columns = Columns.of(_rows(job_id, chunks))
    try:
        if fmt == "parquet":
            assert output is not None
            return int(write_parquet(_rows(job_id, chunks), columns, os.fspath(output)))
        if output is None:
            return int(write_csv(_rows(job_id, chunks), columns, sys.stdout))
        with open(output, "w", encoding="utf-8", newline="") as out:
            return int(write_csv(_rows(job_id, chunks), columns, out))
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc.strerror or exc}") from None


def to_arrow(job_id: int, *, chunks: bool = False) -> Any:
    """The job's results as a `pyarrow.Table`, one row per document (or chunk)."""
    import pyarrow as pa

    columns = Columns.of(_rows(job_id, chunks))
    return pa.Table.from_batches(list(arrow_batches(_rows(job_id, chunks), columns)),
                                 schema=columns.arrow_schema())


def to_pandas(job_id: int, *, chunks: bool = False) -> Any:
    """The job's results as a `pandas.DataFrame`.

    Raises:
        InputError: pandas is not installed.
    """
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise InputError("to_pandas() needs pandas, which is not installed: "
                         "pip install pandas, or use to_arrow()") from None
    return to_arrow(job_id, chunks=chunks).to_pandas()
