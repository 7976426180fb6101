"""The text and metadata of one file, by its format: plain text, Markdown, HTML, PDF, Word.

Guarantees: a file is read only once it is known to be a regular file of a supported suffix
within the byte limit (`readable_suffix`), text is decoded by workers/ingest/decoding.py, and
anything unreadable raises `Rejected` with one sentence naming the file; JSONL is read line by
line with a bounded buffer (`bounded_lines`), so a huge line is never held whole.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import PurePath
from typing import IO, Any

from docqueue.workers.ingest.decoding import Rejected as _Rejected
from docqueue.workers.ingest.decoding import decode_text
from docqueue.workers.ingest.documents import over_limit
from docqueue.workers.ingest.office import docx_text

SUPPORTED_SUFFIXES = (".docx", ".gz", ".htm", ".html", ".jsonl", ".md", ".pdf", ".txt", ".zip")
# What a .gz or a zip member may hold (archives do not nest).
DOCUMENT_SUFFIXES = (".docx", ".htm", ".html", ".md", ".pdf", ".txt")
SNIFF_BYTES = 8192  # a NUL byte this early marks a binary file

# pypdf logs its complaints about a broken file ("EOF marker not found"); with no handler of
# its own they reached the terminal beside the document's error. They belong in the log only.
# (The parsers themselves, pypdf, BeautifulSoup and python-docx, load with the first file of
# their kind: a job of text files does not pay their ~40 MB and half second.)
logging.getLogger("pypdf").addHandler(logging.NullHandler())


def read_text(
    stream: IO[bytes], source: str, suffix: str, max_bytes: int
) -> tuple[str, dict[str, Any]]:
    """The text and metadata of one non-JSONL file."""
    if suffix == ".pdf":
        return _pdf_text(stream, source, max_bytes)
    if suffix == ".docx":
        return docx_text(stream, source, max_bytes)
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after it was measured
        raise _Rejected(over_limit(source, len(data), max_bytes))
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
    import bs4

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
    import pypdf

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


def bounded_lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
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


def readable_suffix(source: str, info: os.stat_result, max_bytes: int) -> str:
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
        raise _Rejected(over_limit(source, info.st_size, max_bytes))
    return suffix
