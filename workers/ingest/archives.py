"""Compressed inputs: a `.gz` file is the one document inside it, a `.zip` holds one per member.

Every limit counts decompressed bytes, never the compressed size a file shows on disk:

- a gzip'd document (`notes.txt.gz`) is read up to DOCQ_MAX_DOCUMENT_BYTES decompressed and
  refused past it; a gzip'd JSONL stream (`corpus.jsonl.gz`) keeps its per-line limit and is
  refused once it has expanded more than MAX_EXPANSION times its compressed size (a gzip bomb
  otherwise costs minutes of CPU for nothing);
- a zip member is refused when it declares more than the limit (zipfile never reads past the
  size a member declares, so a member cannot lie its way through), and a whole archive whose
  members declare more than MAX_EXPANSION times its size is refused as a zip bomb before any
  member is read (that catches the overlapping-member bombs whose members are each small);
- a member whose name is absolute, climbs out with `..`, or uses backslashes or a drive letter
  is refused by name (nothing is ever extracted to disk, but such names are a zip made to
  attack, and they would make ids that look like paths elsewhere);
- archives inside archives are not opened (bombs nest), and neither is JSONL inside a zip (its
  lines would need ids of their own: gzip the JSONL file instead); hidden members (a part
  starting with '.') and macOS resource forks (`__MACOSX/`) are skipped, as a directory walk
  skips hidden files.
"""

from __future__ import annotations

import gzip
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from docqueue.workers.ingest.decoding import Rejected

MAX_EXPANSION = 200  # decompressed / compressed: ordinary text stays far under 20
MAX_MEMBERS = 100_000
ARCHIVE_SUFFIXES = (".gz", ".zip")
_MEMBER_REFUSED = frozenset({".gz", ".zip", ".jsonl"})


def gzip_inner_suffix(source: str) -> str:
    """The suffix of the file a `.gz` holds: `.txt` for `notes.txt.gz`, '' if it has none."""
    return PurePosixPath(source.removesuffix(PurePosixPath(source).suffix)).suffix.lower()


def gunzip_document(stream: IO[bytes], source: str, max_bytes: int) -> bytes:
    """The decompressed bytes of a gzip'd document, at most `max_bytes` of them.

    Raises:
        Rejected: not gzip, truncated or damaged, or over the limit once decompressed.
    """
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as inner:
            data = inner.read(max_bytes + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise Rejected(f"{source} is not a readable gzip file ({_short(exc)})") from None
    if len(data) > max_bytes:
        raise Rejected(
            f"{source} decompresses to more than {max_bytes:,} bytes, over the limit of "
            f"{max_bytes:,} bytes")
    return data


class BoundedGunzip:
    """A gzip stream for JSONL that refuses to expand past `MAX_EXPANSION` times `compressed`.

    It offers `read` and `readline`, what the JSONL reader uses; a damaged stream is Rejected.
    """

    def __init__(self, stream: IO[bytes], source: str, compressed_bytes: int) -> None:
        self._inner = gzip.GzipFile(fileobj=stream, mode="rb")
        self._source = source
        self._budget = max(compressed_bytes, 1 << 16) * MAX_EXPANSION
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        return self._count(self._call(self._inner.read, size))

    def readline(self, size: int = -1) -> bytes:
        return self._count(self._call(self._inner.readline, size))

    def seek(self, offset: int) -> None:
        self._inner.seek(offset)
        self._read = offset

    def _call(self, method: Callable[[int], bytes], size: int) -> bytes:
        try:
            return method(size)
        except (OSError, EOFError, zlib.error) as exc:
            raise Rejected(f"{self._source} is not a readable gzip file ({_short(exc)})") from None

    def _count(self, data: bytes) -> bytes:
        self._read += len(data)
        if self._read > self._budget:
            raise Rejected(
                f"{self._source} expands more than {MAX_EXPANSION} times its compressed size: "
                "refused as a compression bomb")
        return data


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a zip: its data, or why it is refused (`problem` set, `data` None)."""

    name: str
    suffix: str
    data: bytes | None
    problem: str | None = None


def zip_members(
    stream: IO[bytes], source: str, archive_bytes: int, max_bytes: int, supported: tuple[str, ...]
) -> Iterator[Member]:
    """The members of the zip at `stream`, in archive order, each read or refused.

    Raises:
        Rejected: the whole archive: not a zip, empty, too many members, or a zip bomb.
    """
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Rejected(f"{source} is not a readable zip file ({_short(exc)})") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir() and not _hidden(i.filename)]
        if not infos:
            raise Rejected(f"{source} holds no files (hidden ones are skipped)")
        if len(infos) > MAX_MEMBERS:
            raise Rejected(f"{source} holds {len(infos):,} files, over the limit of "
                           f"{MAX_MEMBERS:,}")
        declared = sum(i.file_size for i in infos)
        if declared > max(max_bytes, archive_bytes * MAX_EXPANSION):
            raise Rejected(
                f"{source} declares {declared:,} bytes once decompressed, more than "
                f"{MAX_EXPANSION} times its {archive_bytes:,} bytes: refused as a zip bomb")
        for info in infos:
            yield _member(archive, info, source, max_bytes, supported)


def _member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, max_bytes: int,
    supported: tuple[str, ...],
) -> Member:
    name = info.filename
    suffix = PurePosixPath(name).suffix.lower()
    label = f"{source}:{name}"

    def refused(problem: str) -> Member:
        return Member(name, suffix, None, f"{label} {problem}")

    if problem := unsafe_member_name(name):
        return refused(problem)
    if stat.S_ISLNK(info.external_attr >> 16):
        return refused("is a symbolic link; links in archives are not followed")
    if suffix in _MEMBER_REFUSED:
        what = "a JSONL file" if suffix == ".jsonl" else "an archive"
        hint = "gzip the JSONL file instead" if suffix == ".jsonl" else "archives do not nest"
        return refused(f"is {what} inside a zip, which is not read ({hint})")
    if suffix not in supported:
        kind = f"the extension {suffix!r}" if suffix else "no extension"
        return refused(f"has {kind}; the supported ones are {', '.join(supported)}")
    if info.flag_bits & 0x1:
        return refused("is encrypted and needs a password")
    if info.file_size > max_bytes:
        return refused(f"is {info.file_size:,} bytes decompressed, over the limit of "
                       f"{max_bytes:,} bytes")
    try:
        with archive.open(info) as member:
            data = member.read(max_bytes + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
        return refused(f"cannot be decompressed ({_short(exc)})")
    if len(data) > max_bytes:  # zipfile stops at the declared size; this is belt and braces
        return refused(f"decompresses past the limit of {max_bytes:,} bytes")
    return Member(name, suffix, data)


def unsafe_member_name(name: str) -> str | None:
    """Why a member's name is refused, or None: absolute, `..`, backslash or a drive letter."""
    if name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return "has an absolute or non-POSIX path; refused (a path-traversal member)"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the archive with '..'; refused (a path-traversal member)"
    if "\x00" in name:
        return "has a NUL character in its name; refused"
    return None


def _hidden(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") and p not in (".", "..") for p in parts) or (
        bool(parts) and parts[0] == "__MACOSX")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
