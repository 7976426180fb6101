"""Reading sources: every format, ids, hashes, streaming, and a clear error for each bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import docx
import pypdf
import pytest

from docqueue.workers.ingest import sources
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.ingest.sources import iter_documents

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


def test_undetectable_bytes_name_the_first_bad_byte(tmp_path: Path) -> None:
    # Given bytes that are no text in any encoding (high bytes, no NUL)
    rnd = random.Random(3)
    noise = bytes(rnd.randrange(0x80, 0x100) for _ in range(400))
    # When read / Then refused, naming the first byte that is not UTF-8
    doc = only(write(tmp_path / "noise.md", noise))
    assert_clear_error(doc, "noise.md", "not valid UTF-8", "offset 0", "no known encoding")


def test_a_file_over_the_limit_is_refused_by_its_size(tmp_path: Path) -> None:
    path = write(tmp_path / "big.txt", "x" * 2_500)
    doc = only(path, max_bytes=1_000)
    assert_clear_error(doc, "big.txt", "2,500 bytes", "limit of 1,000 bytes")
    assert doc.size_bytes == 2_500


def test_an_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "slides.pptx", b"PK\x03\x04"))
    assert_clear_error(doc, "slides.pptx", "'.pptx'", ".txt", ".md", ".html", ".pdf", ".jsonl",
                       ".gz", ".zip", ".docx")


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


# -- legacy encodings ---------------------------------------------------------------------------

FRENCH = "Le café était très chaud. Über die Brücke gehen wir, naïve façade, señor.\n"
QUOTES = "He said \u201chello\u201d \u2013 it cost \u20ac5 \u2026 that\u2019s all. A naïve café.\n"


@pytest.mark.parametrize(
    ("name", "data", "text"),
    [
        ("latin1.txt", FRENCH.encode("latin-1"), FRENCH),
        ("short-latin1.md", b"caf\xe9 au lait", "café au lait"),
        ("windows1252.txt", QUOTES.encode("cp1252"), QUOTES),
    ],
)
def test_latin1_and_windows1252_are_detected_and_recorded(
    tmp_path: Path, name: str, data: bytes, text: str
) -> None:
    # Given text saved in Latin-1 or Windows-1252 (not valid UTF-8)
    path = write(tmp_path / name, data)
    # When it is read
    doc = only(path)
    # Then it reads as written, and the metadata names the encoding and the confidence
    assert doc.error is None, doc.error
    assert doc.text == text
    assert doc.metadata["encoding"] == "cp1252"  # Latin-1's printable range, and more
    assert doc.metadata["encoding_confidence"] >= 0.8
    assert doc.content_hash == hashlib.sha256(text.encode()).hexdigest()


def test_cyrillic_in_windows1251_is_detected(tmp_path: Path) -> None:
    text = "Привет, как дела? Всё хорошо, спасибо. Москва — столица России.\n"
    doc = only(write(tmp_path / "ru.txt", text.encode("cp1251")))
    assert (doc.text, doc.metadata["encoding"]) == (text, "cp1251")


def test_text_below_the_confidence_floor_is_refused_with_the_guess(tmp_path: Path) -> None:
    # Given ASCII words glued by random high bytes: no encoding reads it as text
    rnd = random.Random(35)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and",
             "runs", "away"]
    data = bytearray()
    for _ in range(80):
        data += rnd.choice(words).encode()
        data += bytes([rnd.randrange(0x80, 0x100)]) if rnd.random() < 0.5 else b" "
    # When read / Then refused, with the best guess and the floor in the reason
    doc = only(write(tmp_path / "mojibake.txt", bytes(data)))
    assert_clear_error(doc, "mojibake.txt", "cannot be told with confidence", "best guess",
                       "under the floor of 80%", "convert it to UTF-8")


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be"])
def test_utf16_with_a_byte_order_mark_is_read(tmp_path: Path, codec: str) -> None:
    # Given UTF-16 text with its byte-order mark (full of NUL bytes, yet text)
    text = "Grüße aus Köln — 東京\n"
    data = text.encode(codec) if codec == "utf-16" else b"\xfe\xff" + text.encode(codec)
    # When read / Then decoded, the mark dropped, the encoding recorded
    doc = only(write(tmp_path / "wide.txt", data))
    assert doc.error is None, doc.error
    assert doc.text == text
    assert doc.metadata["encoding"].startswith("utf-16")


def test_truncated_utf16_is_refused(tmp_path: Path) -> None:
    doc = only(write(tmp_path / "cut.txt", b"\xff\xfeh\x00i\x00!"))
    assert_clear_error(doc, "cut.txt", "UTF-16-LE byte-order mark", "not valid UTF-16-LE")


# -- compressed files -------------------------------------------------------------------------


def test_a_gzipped_text_file_is_its_document(tmp_path: Path) -> None:
    # Given notes.txt compressed with gzip
    path = write(tmp_path / "notes.txt.gz", gzip.compress("Compressed café\n".encode()))
    # When read / Then the document is the text inside, sized decompressed
    doc = only(path)
    assert (doc.text, doc.size_bytes) == ("Compressed café\n", len("Compressed café\n".encode()))
    assert doc.metadata == {"format": "txt", "compression": "gzip"}
    assert doc.external_id == path.as_posix()


def test_a_gzipped_latin1_html_file_is_decoded_after_decompression(tmp_path: Path) -> None:
    page = "<html><title>Café</title><p>Très bien</p></html>".encode("latin-1")
    doc = only(write(tmp_path / "page.html.gz", gzip.compress(page)))
    assert doc.text == "Très bien"
    assert doc.metadata["title"] == "Café" and doc.metadata["encoding"] == "cp1252"


def test_a_gzipped_jsonl_file_gives_its_lines(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(3))
    docs = read(write(tmp_path / "set.jsonl.gz", gzip.compress(lines.encode())))
    assert [(d.external_id, d.text) for d in docs] == [(f"d{i}", f"text {i}") for i in range(3)]


def test_a_gzip_over_the_limit_once_decompressed_is_refused(tmp_path: Path) -> None:
    # Given 5,000 bytes of text that compress to a few dozen, and a limit of 1,000
    path = write(tmp_path / "bomb.txt.gz", gzip.compress(b"a" * 5_000))
    assert path.stat().st_size < 1_000
    # When read / Then refused by its decompressed size
    doc = only(path, max_bytes=1_000)
    assert_clear_error(doc, "bomb.txt.gz", "decompresses to more than 1,000 bytes")


def test_a_gzipped_jsonl_bomb_is_refused(tmp_path: Path) -> None:
    # Given a JSONL.gz that expands over 200 times (20 MB of blank lines in about 20 kB)
    path = write(tmp_path / "bomb.jsonl.gz", gzip.compress(b"\n" * 20_000_000, 9))
    # When read / Then refused as a compression bomb
    docs = read(path)
    assert_clear_error(docs[-1], "bomb.jsonl.gz", "compression bomb")


# gzip's header carries the time it was written: mtime=0 keeps the bytes, and the ids below keep
# the test names, the same in every process (xdist's workers must collect the same tests).
@pytest.mark.parametrize(
    ("name", "data", "problem"),
    [
        ("broken.txt.gz", b"\x1f\x8b\x08\x00garbage", "not a readable gzip file"),
        ("plain.txt.gz", b"not gzip at all", "not a readable gzip file"),
        ("archive.zip.gz", gzip.compress(b"PK", mtime=0), "'.zip' file compressed with gzip"),
    ],
    ids=["broken", "plain", "zip-inside"],
)
def test_a_bad_gzip_is_refused_with_its_reason(
    tmp_path: Path, name: str, data: bytes, problem: str
) -> None:
    assert_clear_error(only(write(tmp_path / name, data)), name, problem)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_each_member_of_a_zip_is_a_document(tmp_path: Path) -> None:
    # Given a zip of two texts in folders, a Latin-1 file, a hidden file and a macOS fork
    path = make_zip(tmp_path / "corpus.zip", {
        "docs/a.txt": b"Alpha", "docs/b.md": b"# Beta", "old/c.txt": FRENCH.encode("latin-1"),
        "docs/.DS_Store": b"\x00\x01", "__MACOSX/docs/._a.txt": b"\x00",
    })
    # When it is read
    docs = read(path)
    # Then each visible member is a document named <zip id>:<member path>, in archive order
    name = path.as_posix()
    assert [(d.external_id, d.source, d.text) for d in docs] == [
        (f"{name}:docs/a.txt", f"{name}:docs/a.txt", "Alpha"),
        (f"{name}:docs/b.md", f"{name}:docs/b.md", "# Beta"),
        (f"{name}:old/c.txt", f"{name}:old/c.txt", FRENCH),
    ]
    assert docs[0].metadata == {"format": "txt", "archive": name}
    assert docs[2].metadata["encoding"] == "cp1252"


def test_path_traversal_members_are_refused_and_the_others_read(tmp_path: Path) -> None:
    # Given a zip made to attack: members that climb out or are absolute, beside a good one
    path = make_zip(tmp_path / "evil.zip", {
        "../../etc/passwd.txt": b"root", "/abs/path.txt": b"abs", "ok.txt": b"Fine",
        "dir\\win.txt": b"win", "nested/inner.zip": b"PK", "data.jsonl": b"{}",
        "tool.exe": b"MZ",
    })
    # When it is read
    docs = {d.external_id.rpartition(".zip:")[2]: d for d in read(path)}
    # Then each bad member is refused with its reason, and the good one is a document
    assert docs["ok.txt"].text == "Fine"
    assert_clear_error(docs["../../etc/passwd.txt"], "climbs out", "path-traversal")
    assert_clear_error(docs["/abs/path.txt"], "absolute", "path-traversal")
    assert_clear_error(docs["dir\\win.txt"], "non-POSIX", "path-traversal")
    assert_clear_error(docs["nested/inner.zip"], "an archive inside a zip", "do not nest")
    assert_clear_error(docs["data.jsonl"], "JSONL file inside a zip", "gzip")
    assert_clear_error(docs["tool.exe"], "'.exe'", "supported")


def test_a_zip_bomb_is_refused_before_any_member_is_read(tmp_path: Path) -> None:
    # Given 100 members of 100 kB of one letter each: 10 MB declared in about 30 kB
    path = make_zip(tmp_path / "bomb.zip", {f"m{i}.txt": b"a" * 100_000 for i in range(100)})
    assert path.stat().st_size * 200 < 10_000_000
    # When it is read / Then the whole archive is refused as a zip bomb
    doc = only(path)
    assert_clear_error(doc, "bomb.zip", "10,000,000 bytes", "zip bomb")


def test_a_zip_member_over_the_limit_is_refused_by_its_decompressed_size(tmp_path: Path) -> None:
    rnd = random.Random(1)
    big = "".join(rnd.choice("abcdefghij ") for _ in range(2_000)).encode()
    path = make_zip(tmp_path / "mixed.zip", {"big.txt": big, "small.txt": b"small"})
    big_doc, small_doc = read(path, max_bytes=1_000)
    assert_clear_error(big_doc, "big.txt", "2,000 bytes decompressed", "limit of 1,000 bytes")
    assert small_doc.text == "small"


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"PK\x03\x04 truncated", "not a readable zip file"), (b"", "not a readable zip file")],
)
def test_a_damaged_zip_is_refused(tmp_path: Path, data: bytes, problem: str) -> None:
    assert_clear_error(only(write(tmp_path / "bad.zip", data)), "bad.zip", problem)


# -- Word documents ---------------------------------------------------------------------------


def docx_bytes(paragraphs: list[str], table: list[list[str]] | None = None) -> bytes:
    document = docx.Document()
    document.core_properties.title = "Minutes"
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                grid.cell(r, c).text = cell
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def test_a_word_document_gives_its_paragraphs_and_tables(tmp_path: Path) -> None:
    # Given a .docx with two paragraphs, an empty one and a table
    data = docx_bytes(["First point.", "", "Second point."], [["name", "vote"], ["Ana", "yes"]])
    # When it is read, alone and inside a zip
    doc = only(write(tmp_path / "minutes.docx", data))
    [member] = read(make_zip(tmp_path / "board.zip", {"minutes.docx": data}))
    # Then blocks come in order, table rows as tab-separated cells
    assert doc.text == "First point.\n\nSecond point.\n\nname\tvote\nAna\tyes"
    assert doc.metadata == {"format": "docx", "title": "Minutes"}
    assert member.text == doc.text


def test_a_damaged_or_empty_word_document_is_refused(tmp_path: Path) -> None:
    broken = only(write(tmp_path / "broken.docx", b"PK\x03\x04 not really"))
    empty = only(write(tmp_path / "empty.docx", docx_bytes([])))
    assert_clear_error(broken, "broken.docx", "not a readable Word document")
    assert_clear_error(empty, "empty.docx", "holds no text")
