"""Reading sources: every format, ids, hashes, streaming, and a clear error for each bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pypdf
import pytest

from workers.ingest import sources
from workers.ingest.sources import SourceDocument, iter_documents

LIMIT = 1_000_000


def read(*inputs: Any, max_bytes: int = LIMIT) -> list[SourceDocument]:
    return list(iter_documents(list(inputs), max_bytes=max_bytes))


def only(*inputs: Any, max_bytes: int = LIMIT) -> SourceDocument:
    [doc] = read(*inputs, max_bytes=max_bytes)
    return doc


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def pdf_with_text(pages: list[str]) -> bytes:
    """A minimal PDF, written by hand, with one line of Helvetica text per page."""
    count = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(count))
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {count} >>",
    ]
    for i, line in enumerate(pages):
        stream = f"BT /F1 18 Tf 72 720 Td ({line}) Tj ET"
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R"
            f" /Resources << /Font << /F1 {3 + 2 * count} 0 R >> >> >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def blank_pdf() -> bytes:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=200, height=200)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def assert_clear_error(doc: SourceDocument, *fragments: str) -> None:
    """An error is one sentence naming the input and the problem, and nothing else is set."""
    assert doc.error is not None, doc
    assert doc.text is None and doc.content_hash is None
    assert "Traceback" not in doc.error and "\n" not in doc.error
    assert doc.error.endswith(".")
    for fragment in fragments:
        assert fragment.lower() in doc.error.lower(), (fragment, doc.error)


# -- formats ------------------------------------------------------------------------------------


def test_a_text_file_is_read_with_its_hash_size_and_id(tmp_path: Path, monkeypatch: Any) -> None:
    # Given a text file, named through a path with redundant parts
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "docs" / "note.txt", "Hello, café.\n")
    # When it is read
    doc = only("./docs/../docs//note.txt")
    # Then the id is the normalized path, and text, hash and size are those of the file
    data = "Hello, café.\n".encode()
    assert doc == SourceDocument(
        external_id="docs/note.txt",
        source="docs/note.txt",
        text="Hello, café.\n",
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        metadata={"format": "txt"},
        error=None,
    )


def test_markdown_is_read_as_is(tmp_path: Path) -> None:
    path = write(tmp_path / "README.md", "# Title\n\nSome *text*.\n")
    doc = only(path)
    assert doc.text == "# Title\n\nSome *text*.\n"
    assert doc.metadata == {"format": "md"}


def test_html_becomes_paragraphs_of_visible_text(tmp_path: Path) -> None:
    # Given an HTML page with a title, scripts, styles, inline markup, a list and a line break
    markup = """<!DOCTYPE html><html><head><title>The  Report</title>
    <style>p { color: red }</style><script>var hidden = 1;</script></head>
    <body><h1>Findings</h1>
    <p>First   paragraph with <b>bold</b> and
    <a href="#">a link</a>.</p><!-- a comment -->
    <div>Second<br>line two</div>
    <ul><li>one</li><li>two &amp; three</li></ul>
    <script>document.write("no")</script></body></html>"""
    path = write(tmp_path / "page.html", markup)
    # When it is read
    doc = only(path)
    # Then scripts, styles and comments are gone, inline text stays together, blocks are paragraphs
    assert doc.text == (
        "Findings\n\nFirst paragraph with bold and a link.\n\nSecond\nline two\n\none\n\n"
        "two & three"
    )
    assert doc.metadata == {"format": "html", "title": "The Report"}


def test_htm_is_html_too(tmp_path: Path) -> None:
    path = write(tmp_path / "old.HTM", "<p>Old page</p>")
    assert only(path).text == "Old page"


def test_a_pdf_gives_its_pages_separated_by_blank_lines(tmp_path: Path) -> None:
    # Given a two-page PDF with text on each page
    path = write(tmp_path / "paper.pdf", pdf_with_text(["First page text", "Second page text"]))
    # When it is read
    doc = only(path)
    # Then the pages are joined by a blank line
    assert doc.error is None
    assert doc.text == "First page text\n\nSecond page text"
    assert doc.metadata["pages"] == 2
    assert doc.size_bytes == path.stat().st_size


def test_jsonl_gives_one_document_per_line(tmp_path: Path) -> None:
    # Given JSONL lines with and without ids, with metadata and a blank line
    lines = [
        json.dumps({"id": "a", "text": "Alpha", "metadata": {"lang": "en"}}),
        "",
        json.dumps({"text": "No id here"}),
        json.dumps({"id": 7, "text": "Seven"}),
    ]
    path = write(tmp_path / "corpus" / "set.jsonl", "\n".join(lines) + "\n")
    # When the directory holding it is read
    docs = read(tmp_path / "corpus")
    # Then each line is a document: given ids win, others are named by file and line number
    assert [(d.external_id, d.source, d.text, d.metadata) for d in docs] == [
        ("a", f"{path.as_posix()}:1", "Alpha", {"lang": "en"}),
        ("set.jsonl:3", f"{path.as_posix()}:3", "No id here", {}),
        ("7", f"{path.as_posix()}:4", "Seven", {}),
    ]
    assert docs[0].content_hash == hashlib.sha256(b"Alpha").hexdigest()
    assert docs[0].size_bytes == 5


def test_jsonl_is_streamed_line_by_line(tmp_path: Path) -> None:
    # Given a JSONL file of about 4 MB
    line = json.dumps({"text": "word " * 400}) + "\n"
    path = write(tmp_path / "big.jsonl", line * 2_000)
    assert path.stat().st_size > 4_000_000
    # When its documents are consumed one at a time
    tracemalloc.start()
    try:
        count = sum(1 for doc in iter_documents([path], max_bytes=LIMIT) if doc.error is None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then all are read while memory stays far below the file's size
    assert count == 2_000
    assert peak < 1_000_000


def test_in_memory_records_pairs_and_mappings(tmp_path: Path) -> None:
    # Given (id, text) pairs and mappings, with and without ids, next to a file
    path = write(tmp_path / "x.txt", "From a file")
    records = [("p1", "Pair one"), {"id": "m1", "text": "Map one", "metadata": {"k": 1}}]
    # When they are read in one stream
    docs = read(*records, {"text": "Anonymous"}, path)
    # Then each keeps its id (or gets one by position), in-memory ones have no source
    assert [(d.external_id, d.source, d.text, d.metadata) for d in docs] == [
        ("p1", None, "Pair one", {}),
        ("m1", None, "Map one", {"k": 1}),
        ("record:3", None, "Anonymous", {}),
        (path.as_posix(), path.as_posix(), "From a file", {"format": "txt"}),
    ]
    assert docs[0].size_bytes == len(b"Pair one")


def test_a_single_path_may_be_passed_alone(tmp_path: Path) -> None:
    path = write(tmp_path / "alone.txt", "Alone")
    assert [d.text for d in iter_documents(str(path), max_bytes=LIMIT)] == ["Alone"]


# -- directories and globs ----------------------------------------------------------------------


def test_a_directory_is_walked_recursively_in_sorted_order(tmp_path: Path) -> None:
    # Given a tree with nested folders, hidden files and a hidden folder
    root = tmp_path / "docs"
    for name in ["b.txt", "a/z.md", "a/b/c.txt", "c.txt", ".hidden.txt", ".git/config.txt"]:
        write(root / name, f"text of {name}")
    write(root / "a" / ".secret" / "x.txt", "hidden too")
    # When the directory is read
    docs = read(root)
    # Then visible files come in sorted order with ids relative to the directory
    assert [d.external_id for d in docs] == ["a/b/c.txt", "a/z.md", "b.txt", "c.txt"]
    assert docs[0].source == (root / "a" / "b" / "c.txt").as_posix()
    assert all(d.error is None for d in docs)


def test_a_recursive_glob_matches_files_at_every_depth(tmp_path: Path, monkeypatch: Any) -> None:
    # Given Markdown and text files at several depths
    monkeypatch.chdir(tmp_path)
    for name in ["docs/top.md", "docs/x/deep.md", "docs/x/y/deeper.md", "docs/x/skip.txt"]:
        write(tmp_path / name, f"text of {name}")
    write(tmp_path / "docs" / ".hidden" / "h.md", "hidden")
    # When a recursive glob is read
    docs = read("docs/**/*.md")
    # Then only the Markdown files match, named by their path as given, in sorted order
    assert [d.external_id for d in docs] == ["docs/top.md", "docs/x/deep.md", "docs/x/y/deeper.md"]


def test_a_flat_glob_does_not_descend(tmp_path: Path) -> None:
    for name in ["n/a.txt", "n/b.txt", "n/sub/c.txt"]:
        write(tmp_path / name, "x")
    docs = read(f"{tmp_path.as_posix()}/n/*.txt")
    assert [Path(d.external_id).name for d in docs] == ["a.txt", "b.txt"]


def test_a_glob_without_matches_and_an_empty_directory_are_reported(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / ".only-hidden.txt", "x")
    no_match, empty_dir = read(f"{tmp_path}/*.nothing", tmp_path / "empty")
    assert_clear_error(no_match, "matches no file", "*.nothing")
    assert_clear_error(empty_dir, "holds no files", "empty")


# -- bad input ----------------------------------------------------------------------------------


def test_a_missing_path_is_an_error_and_the_stream_goes_on(tmp_path: Path) -> None:
    good = write(tmp_path / "good.txt", "Fine")
    missing, after = read(tmp_path / "nope.txt", good)
    assert_clear_error(missing, "nope.txt", "does not exist")
    assert missing.external_id == (tmp_path / "nope.txt").as_posix()
    assert after.text == "Fine"


@pytest.mark.parametrize(
    ("content", "problem"), [(b"", "is empty"), (b" \n\t\n ", "only whitespace")]
)
def test_an_empty_or_blank_file_is_an_error(tmp_path: Path, content: bytes, problem: str) -> None:
    doc = only(write(tmp_path / "blank.txt", content))
    assert_clear_error(doc, "blank.txt", problem)


def test_a_binary_file_is_an_error(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "image.txt", b"GIF89a\x00\x01\x02"))
    assert_clear_error(doc, "image.txt", "binary", "offset 6")


def test_invalid_utf8_names_the_byte_offset(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "latin1.md", b"caf\xe9 au lait"))
    assert_clear_error(doc, "latin1.md", "not valid UTF-8", "0xe9", "offset 3")


def test_a_file_over_the_limit_is_refused_by_its_size(tmp_path: Path) -> None:
    path = write(tmp_path / "big.txt", "x" * 2_500)
    doc = only(path, max_bytes=1_000)
    assert_clear_error(doc, "big.txt", "2,500 bytes", "limit of 1,000 bytes")
    assert doc.size_bytes == 2_500


def test_an_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "slides.docx", b"PK\x03\x04"))
    assert_clear_error(doc, "slides.docx", "'.docx'", ".txt", ".md", ".html", ".pdf", ".jsonl")


def test_a_file_that_cannot_be_opened_is_an_error(tmp_path: Path, monkeypatch: Any) -> None:
    # Given a file the process may not read
    path = write(tmp_path / "private.txt", "secret")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make open() refuse as the OS would

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(sources, "open", refuse, raising=False)
    # When it is read / Then the error says so
    assert_clear_error(only(path), "private.txt", "permission denied")


def test_a_corrupt_pdf_is_an_error(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog"))
    assert_clear_error(doc, "broken.pdf", "not a readable PDF")


def test_a_pdf_without_text_says_so(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "scan.pdf", blank_pdf()))
    assert_clear_error(doc, "scan.pdf", "no extractable text")


def test_bad_jsonl_lines_are_errors_and_good_lines_still_come(tmp_path: Path) -> None:
    # Given a JSONL file with one bad line of each kind between good ones
    lines = [
        '{"id": "ok1", "text": "Good"}',
        "{not json",
        '["an", "array"]',
        '{"id": "x"}',
        '{"id": "y", "text": ""}',
        '{"id": "z", "text": 42}',
        '{"id": "w", "text": "   "}',
        '{"id": ["list"], "text": "bad id"}',
        '{"id": "m", "text": "t", "metadata": [1]}',
        '{"id": "ok2", "text": "Also good"}',
    ]
    path = write(tmp_path / "mixed.jsonl", "\n".join(lines))
    # When it is read
    docs = read(path)
    # Then each bad line is an error naming the file and line, and the good ones are documents
    assert [d.text for d in docs if d.error is None] == ["Good", "Also good"]
    bad = {int(d.source.rpartition(":")[2]): d for d in docs if d.error and d.source}
    name = path.as_posix()
    assert_clear_error(bad[2], f"{name} line 2", "not valid JSON")
    assert_clear_error(bad[3], f"{name} line 3", "an array, not an object")
    assert_clear_error(bad[4], f"{name} line 4", "no 'text'")
    assert_clear_error(bad[5], f"{name} line 5", "is empty")
    assert_clear_error(bad[6], f"{name} line 6", "'text' that is a number")
    assert_clear_error(bad[7], f"{name} line 7", "only whitespace")
    assert_clear_error(bad[8], f"{name} line 8", "'id' that is an array")
    assert_clear_error(bad[9], f"{name} line 9", "'metadata' that is an array")
    assert bad[2].external_id == "mixed.jsonl:2" or bad[2].external_id.endswith("mixed.jsonl:2")
    assert bad[5].external_id == "y"


def test_a_jsonl_line_over_the_limit_is_skipped_without_holding_it(tmp_path: Path) -> None:
    huge = json.dumps({"id": "huge", "text": "x" * 50_000})
    path = write(tmp_path / "l.jsonl", f'{{"text": "a"}}\n{huge}\n{{"text": "b"}}\n')
    first, big, last = read(path, max_bytes=1_000)
    assert_clear_error(big, "line 2", f"{len(huge):,} bytes", "limit of 1,000 bytes")
    assert (first.text, last.text) == ("a", "b")


def test_an_empty_jsonl_file_and_a_binary_one_are_errors(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.jsonl", "\n\n")
    binary = write(tmp_path / "bin.jsonl", b'{"text": "a"}\n\x00\x00')
    one, two = read(empty, binary)
    assert_clear_error(one, "empty.jsonl", "holds no JSON lines")
    assert_clear_error(two, "bin.jsonl", "binary")


def test_a_duplicate_id_is_rejected_naming_the_first_source(tmp_path: Path) -> None:
    # Given the same relative path under two directories, a JSONL id used twice, a record id twice
    write(tmp_path / "one" / "same.txt", "First")
    write(tmp_path / "two" / "same.txt", "Second")
    jsonl = write(tmp_path / "d.jsonl", '{"id": "k", "text": "A"}\n{"id": "k", "text": "B"}\n')
    # When they are read in one stream
    docs = read(tmp_path / "one", tmp_path / "two", jsonl, ("r", "x"), ("r", "y"))
    # Then every first use is kept and every second one names where the id was first used
    assert [d.error is None for d in docs] == [True, False, True, False, True, False]
    assert_clear_error(docs[1], "same.txt", (tmp_path / "one" / "same.txt").as_posix())
    assert_clear_error(docs[3], "repeats the id 'k'", f"{jsonl.as_posix()} line 1")
    assert_clear_error(docs[5], "repeats the id 'r'", "record #1")


def test_bad_records_are_errors(tmp_path: Path) -> None:
    docs = read(
        ("a", None),
        ("b", ""),
        {"id": "c", "text": 3.5},
        ("d", "lone \ud800 surrogate"),
        ("e", "nul \x00 inside"),
        ("too", "many", "items"),
        {"id": "f", "text": "ok", "metadata": {"when": object()}},
        12345,
    )
    assert_clear_error(docs[0], "record #1", "no 'text'")
    assert_clear_error(docs[1], "record #2", "is empty")
    assert_clear_error(docs[2], "record #3", "a number, not a string")
    assert_clear_error(docs[3], "record #4", "lone surrogate at character 5")
    assert_clear_error(docs[4], "record #5", "NUL character")
    assert_clear_error(docs[5], "record #6", "tuple of 3 items")
    assert_clear_error(docs[6], "record #7", "'metadata' that is not JSON")
    assert_clear_error(docs[7], "input #8", "int, not a path or a record")


def test_a_record_over_the_limit_is_refused() -> None:
    doc = only(("big", "é" * 600), max_bytes=1_000)
    assert_clear_error(doc, "record #1", "1,200 bytes", "limit of 1,000 bytes")


def test_every_kind_of_bad_input_in_one_stream_never_raises(tmp_path: Path) -> None:
    # Given a directory holding one bad file of each kind and one good file
    root = tmp_path / "mess"
    write(root / "a-empty.txt", "")
    write(root / "b-binary.md", b"\x00\x01")
    write(root / "c-latin1.txt", b"\xff\xfe")
    write(root / "d-corrupt.pdf", b"%PDF-1.7 nonsense")
    write(root / "e-blank.pdf", blank_pdf())
    write(root / "f-unknown.xyz", "text")
    write(root / "g-bad.jsonl", "{oops\n")
    write(root / "h-good.txt", "Good")
    os.symlink(tmp_path / "gone.txt", root / "i-broken-link.txt")
    # When it is read
    docs = read(root)
    # Then every file gives exactly one document, and only the good one has text
    assert [d.external_id for d in docs] == [
        "a-empty.txt",
        "b-binary.md",
        "c-latin1.txt",
        "d-corrupt.pdf",
        "e-blank.pdf",
        "f-unknown.xyz",
        "g-bad.jsonl:1",
        "h-good.txt",
        "i-broken-link.txt",
    ]
    assert [d.text for d in docs if d.error is None] == ["Good"]
    for doc in docs:
        if doc.error is not None:
            assert_clear_error(doc)
