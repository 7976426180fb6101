"""Tables in: Parquet, CSV, TSV, JSONL, Arrow tables and mappings read as one document a row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from docqueue.workers.errors import InputError
from docqueue.workers.ingest.tables import TableSpec, read_tables

MAX = 1_000_000
SPEC = TableSpec(text="body", id="ticket_id")


def tickets(n: int) -> dict[str, list[object]]:
    return {"ticket_id": [f"T{i}" for i in range(n)],
            "body": [f"ticket {i} text" for i in range(n)],
            "team": ["red", "blue"] * (n // 2), "priority": list(range(n))}


def write_csv(path: Path, rows: list[list[object]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def test_parquet_rows_become_documents_with_the_users_ids_and_metadata(tmp_path: Path) -> None:
    # Given a Parquet file of four tickets in two row groups
    path = tmp_path / "tickets.parquet"
    pq.write_table(pa.table(tickets(4)), path, row_group_size=2)
    # When it is read with its text and id columns named
    docs = list(read_tables(str(path), SPEC, max_bytes=MAX))
    # Then each row is a document keyed by its ticket id, the other columns its metadata
    assert [d.external_id for d in docs] == ["T0", "T1", "T2", "T3"]
    assert docs[1].text == "ticket 1 text" and docs[1].ok
    assert docs[1].metadata == {"team": "blue", "priority": 1}
    assert docs[3].source == f"{path.as_posix()}:4"


def test_csv_and_tsv_stream_with_chosen_metadata_columns(tmp_path: Path) -> None:
    # Given the same rows as a CSV and a TSV
    rows = [["ticket_id", "body", "team", "priority"], ["a", "hello", "red", "1"],
            ["b", "world", "blue", "2"]]
    csv_path = write_csv(tmp_path / "t.csv", rows)
    tsv_path = write_csv(tmp_path / "t.tsv", [[f"{v}x" if i else v for v in r]
                                              for i, r in enumerate(rows)], delimiter="\t")
    # When both are read keeping only the team column
    spec = TableSpec(text="body", id="ticket_id", metadata=("team",))
    docs = list(read_tables([str(csv_path), str(tsv_path)], spec, max_bytes=MAX))
    # Then all four rows are documents with the team alone as metadata
    assert [d.external_id for d in docs] == ["a", "b", "ax", "bx"]
    assert [d.metadata for d in docs] == [{"team": "red"}, {"team": "blue"},
                                          {"team": "redx"}, {"team": "bluex"}]


def test_arrow_tables_mappings_and_jsonl_records_with_several_fields(tmp_path: Path) -> None:
    # Given a pyarrow Table, a list of mappings and a JSONL file with several fields
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"ticket_id": i, "body": f"b{i}", "x": [i]})
                               for i in range(2)) + "\n")
    # When each is read as a table
    from_arrow = list(read_tables(pa.table(tickets(2)), SPEC, max_bytes=MAX))
    from_maps = list(read_tables(iter([{"ticket_id": 7, "body": "seven"}]), SPEC, max_bytes=MAX))
    from_jsonl = list(read_tables(str(jsonl), SPEC, max_bytes=MAX))
    # Then every row is a document, numeric ids as text, nested values kept
    assert [d.external_id for d in from_arrow] == ["T0", "T1"]
    assert from_maps[0].external_id == "7" and from_maps[0].text == "seven"
    assert [(d.external_id, d.metadata) for d in from_jsonl] == [("0", {"x": [0]}),
                                                                 ("1", {"x": [1]})]


def test_a_missing_column_is_one_line_naming_it_and_the_columns_there(tmp_path: Path) -> None:
    # Given a CSV without the named text column
    path = write_csv(tmp_path / "t.csv", [["ticket_id", "text"], ["a", "x"]])
    # When it is opened
    with pytest.raises(InputError) as caught:
        read_tables(str(path), SPEC, max_bytes=MAX)
    # Then the error names the file, the column and the columns it has, on one line
    assert str(caught.value) == f"{path.as_posix()} has no column 'body'; its columns are: " \
                                "ticket_id, text"


def test_bad_rows_are_rejected_with_their_row_number_and_the_rest_go_on(tmp_path: Path) -> None:
    # Given a table with an empty text, a null text, a repeated id and a null id
    table = pa.table({"ticket_id": ["a", "b", "c", "a", None, "d"],
                      "body": ["ok", "", None, "again", "no id", "fine"]})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    # When it is read
    docs = list(read_tables(str(path), SPEC, max_bytes=MAX))
    # Then the good rows are documents and each bad one says why, with its row number
    name = path.as_posix()
    assert [d.external_id for d in docs if d.ok] == ["a", "d"]
    assert [d.error for d in docs if not d.ok] == [
        f"{name} row 2 has no text (its 'body' is empty).",
        f"{name} row 3 has no text (its 'body' is null).",
        f"{name} row 4 repeats the id 'a' of an earlier row.",
        f"{name} row 5 has no id (its 'ticket_id' is empty).",
    ]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("t.parquet", b"ticket_id,body\na,b\n", "is not a readable Parquet file"),
    ("t.csv", b"PAR1\x00\x00\x15\x04binary", "is not a CSV file: it is binary"),
    ("t.jsonl", b"ticket_id,body\n", "is not JSON Lines: its first line is not JSON"),
    ("t.csv", b"", "is empty: a CSV file needs a header row"),
])
def test_a_file_not_of_its_format_is_one_line(tmp_path: Path, name: str, content: bytes,
                                              expected: str) -> None:
    # Given a file whose content is not the format its name says
    path = tmp_path / name
    path.write_bytes(content)
    # When it is opened as a table
    with pytest.raises(InputError) as caught:
        read_tables(str(path), SPEC, max_bytes=MAX)
    # Then one line names the file and the problem
    message = str(caught.value)
    assert message.startswith(f"{path.as_posix()} {expected}") and "\n" not in message


def test_a_csv_row_with_the_wrong_number_of_fields_is_rejected(tmp_path: Path) -> None:
    # Given a CSV whose second row has a field too many
    path = write_csv(tmp_path / "t.csv", [["ticket_id", "body"], ["a", "x"], ["b", "y", "z"],
                                          ["c", "w"]])
    # When it is read
    docs = list(read_tables(str(path), SPEC, max_bytes=MAX))
    # Then that row alone is rejected
    assert [d.external_id for d in docs if d.ok] == ["a", "c"]
    assert docs[1].error == f"{path.as_posix()} row 2 has 3 fields, the header 2."
