"""Tables out: flat rows written as Parquet and CSV in batches, with one type per column."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from docqueue.workers.jobs import export
from docqueue.workers.jobs.export import Columns, write_csv, write_parquet

ROWS = [
    {"id": "T1", "team": "red", "label": "billing", "counts": {"billing": 2}, "status": "ok",
     "error": None, "tokens_in": 10, "cost": 0},
    {"id": "T2", "team": None, "label": None, "counts": None, "status": "error",
     "error": "timed out", "tokens_in": 0, "cost": 0.5},
]


def test_parquet_holds_every_row_with_typed_columns(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Given rows with text, nested, integer and mixed integer/float columns, written 1 per batch
    monkeypatch.setattr(export, "WRITE_ROWS", 1)  # a batch boundary between the two rows
    # When they are written as Parquet
    path = tmp_path / "out.parquet"
    n = write_parquet(iter(ROWS), Columns.of(iter(ROWS)), str(path))
    # Then both rows are there, keyed by id, nested values as JSON text, cost as a float
    table = pq.read_table(path)
    assert n == 2 and table.num_rows == 2
    assert table.column_names == ["id", "team", "label", "counts", "status", "error",
                                  "tokens_in", "cost"]
    assert table.to_pylist()[0] == {"id": "T1", "team": "red", "label": "billing",
                                        "counts": '{"billing": 2}', "status": "ok",
                                        "error": None, "tokens_in": 10, "cost": 0.0}
    assert str(table.schema.field("cost").type) == "double"


def test_csv_has_a_header_and_empty_cells_for_nulls() -> None:
    # Given the same rows
    out = io.StringIO()
    # When they are written as CSV
    write_csv(iter(ROWS), Columns.of(iter(ROWS)), out)
    # Then the header names the columns and a null is an empty cell
    read = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["id"] for r in read] == ["T1", "T2"]
    assert read[1]["team"] == "" and read[1]["error"] == "timed out"
    assert read[0]["counts"] == '{"billing": 2}'
