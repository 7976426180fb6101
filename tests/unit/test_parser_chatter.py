"""A parser's own complaints stay off the terminal: the document's error says what went wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

READ = ("import sys; from docqueue.workers.ingest.sources import iter_documents; "
        "print(next(iter_documents(sys.argv[1], max_bytes=10**6)).error)")


def test_a_broken_pdf_prints_nothing_beside_its_error(tmp_path: Path) -> None:
    # Given a PDF that ends before its EOF marker
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4 broken")
    # When a fresh process reads it (pytest's own log capture would hide a stray line)
    done = subprocess.run([sys.executable, "-c", READ, str(path)], capture_output=True,
                          text=True, timeout=60, check=True)
    # Then the document carries the error and nothing else reached the terminal
    assert "is not a readable PDF" in done.stdout
    assert done.stderr == ""
