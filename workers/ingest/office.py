"""Word documents (.docx): the text of every paragraph and table, in document order.

python-docx reads the package; the package is a zip, so its declared decompressed size is
checked first against the document limit (a .docx bomb is refused before it is parsed).
Headers, footers, comments and footnotes are left out: the body is the document.
"""

from __future__ import annotations

import zipfile
from typing import IO, Any

from docqueue.workers.ingest.archives import MAX_EXPANSION
from docqueue.workers.ingest.decoding import Rejected


def docx_text(stream: IO[bytes], source: str, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """The body text, paragraphs separated by a blank line; table rows as cells joined by tabs.

    Raises:
        Rejected: not a Word document, damaged, a bomb, or without text.
    """
    try:
        with zipfile.ZipFile(stream) as package:
            declared = sum(i.file_size for i in package.infolist())
        size = stream.seek(0, 2)
        stream.seek(0)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Rejected(f"{source} is not a readable Word document ({_short(exc)})") from None
    if declared > max(max_bytes, size * MAX_EXPANSION):
        raise Rejected(f"{source} declares {declared:,} bytes once decompressed: refused as a "
                       "zip bomb")
    import docx  # with the first Word document, not with every producer
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = docx.Document(stream)
        blocks: list[str] = []
        for block in document.iter_inner_content():
            if isinstance(block, Paragraph):
                if text := block.text.strip():
                    blocks.append(text)
            elif isinstance(block, Table):
                rows = ["\t".join(c.text.strip() for c in row.cells) for row in block.rows]
                if table := "\n".join(r for r in rows if r.strip()):
                    blocks.append(table)
        title = document.core_properties.title
    except Exception as exc:
        raise Rejected(f"{source} is not a readable Word document ({_short(exc)})") from None
    if not blocks:
        raise Rejected(f"{source} holds no text")
    metadata: dict[str, Any] = {"format": "docx"}
    if title:
        metadata["title"] = title
    return "\n\n".join(blocks), metadata


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}" if text != type(exc).__name__ else text
