"""Bytes to text for the text formats (txt, md, html), whatever encoding the file was saved in.

The rules, in order:

1. A byte-order mark decides: UTF-8, UTF-16 (LE or BE) or UTF-32; the mark is dropped.
2. A NUL byte early in a file without a mark makes it binary, not text.
3. Valid UTF-8 is UTF-8 (nothing is recorded: it is the default).
4. Anything else is given to charset-normalizer. Its best reading is used when its confidence
   (1 - its "chaos", the share of the text that looks like mojibake) is at least
   MIN_CONFIDENCE; the encoding and the confidence go in the document's metadata. Below the
   floor, or when no encoding fits, the file is refused with the best guess in the reason.

Among readings the detector finds equally likely, the Western ones people save most are
preferred (PREFERRED): a Latin-1 or Windows-1252 letter such as "è" reads as "č" in
Windows-1250 with the same score, and for the corpora docqueue sees the Western reading is the
right one far more often.
"""

from __future__ import annotations

import codecs
from typing import Any

from charset_normalizer import from_bytes

MIN_CONFIDENCE = 0.8  # charset-normalizer's own default cut-off is chaos 0.2: the same floor
PREFERRED = ("cp1252", "latin_1", "iso8859_15")
_TIE = 0.005
_SNIFF_BYTES = 8192  # a NUL byte this early marks a binary file

_BOMS = (  # longest first: the UTF-32 LE mark begins with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class Rejected(Exception):
    """This document cannot be read; the message is the user-facing sentence (no final stop)."""


def binary_problem(head: bytes) -> str | None:
    nul = head.find(b"\x00")
    return None if nul < 0 else f"is binary (a NUL byte at offset {nul:,}), not text"


def decode_text(data: bytes, source: str) -> tuple[str, dict[str, Any]]:
    """The text of `data` and what to record about its encoding (empty for plain UTF-8).

    Raises:
        Rejected: binary, malformed in the encoding its mark names, or of an encoding that
            cannot be told with confidence.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom):].decode(encoding)
            except UnicodeDecodeError as exc:
                raise Rejected(
                    f"{source} starts with a {encoding.upper()} byte-order mark but is not valid "
                    f"{encoding.upper()} ({exc.reason} at offset {exc.start + len(bom):,})"
                ) from None
            return text, ({} if encoding == "utf-8" else {"encoding": encoding})
    if problem := binary_problem(data[:_SNIFF_BYTES]):
        raise Rejected(f"{source} {problem}")
    try:
        return data.decode("utf-8"), {}
    except UnicodeDecodeError as exc:
        first_bad = f"byte {data[exc.start]:#04x} at offset {exc.start:,}"
    return _detected(data, source, first_bad)


def _detected(data: bytes, source: str, first_bad: str) -> tuple[str, dict[str, Any]]:
    matches = list(from_bytes(data, threshold=1.0 - MIN_CONFIDENCE / 2))
    if not matches:
        raise Rejected(
            f"{source} is not valid UTF-8 ({first_bad}) and no known encoding fits it; "
            "convert it to UTF-8")
    least = min(m.chaos for m in matches)
    tied = [m for m in matches if m.chaos <= least + _TIE]
    best_coherence = max(m.coherence for m in tied)
    tied = [m for m in tied if m.coherence >= best_coherence - _TIE]
    # A match stands for every encoding that reads the bytes the same (could_be_from_charset).
    encoding, pick = next(
        ((name, m) for name in PREFERRED for m in tied if name in m.could_be_from_charset),
        (tied[0].encoding, tied[0]))
    confidence = round(1.0 - pick.chaos, 3)
    if confidence < MIN_CONFIDENCE:
        raise Rejected(
            f"{source} is not valid UTF-8 ({first_bad}) and its encoding cannot be told with "
            f"confidence (best guess {encoding}, {confidence:.0%} sure, under the floor "
            f"of {MIN_CONFIDENCE:.0%}); convert it to UTF-8")
    try:
        text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        text = str(pick)
    return text, {"encoding": encoding, "encoding_confidence": confidence}
