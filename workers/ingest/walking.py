"""Walking directories and globs: every file below a directory or matching a pattern, in order.

Guarantees: entries are listed in sorted order, hidden ones (a leading dot) skipped, links to
directories not followed; a directory that cannot be listed is reported as a problem, never
raised. Paths come back normalized with POSIX separators and undecodable bytes as U+FFFD.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import PurePath

from docqueue.workers.ingest.documents import printable

GLOB_MAGIC = frozenset("*?[")


def walk(directory: str, prefix: str, depth: int | None) -> Iterator[tuple[str, str, str | None]]:
    """(path, relative id, problem) for every file below `directory`, in sorted order."""
    try:
        with os.scandir(directory) as entries:
            names = sorted(
                (entry.name, entry.is_dir(follow_symlinks=False))
                for entry in entries
                if not entry.name.startswith(".")
            )
    except OSError as exc:
        problem = f"{normalized(directory)} cannot be listed: {reason(exc)}"
        yield directory, prefix.rstrip("/") or ".", problem
        return
    for name, is_dir in names:
        path = os.path.join(directory, name)
        if not is_dir:
            yield path, printable(prefix + name), None
        elif depth is None or depth > 1:
            yield from walk(path, f"{prefix}{name}/", None if depth is None else depth - 1)


def glob(pattern: str) -> Iterator[tuple[str, str, str | None]]:
    """(path, id, problem) for every file that matches `pattern` (`**` spans directories)."""
    parts = PurePath(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_MAGIC.intersection(part))
    base, rest = os.path.join(".", *parts[:fixed]), parts[fixed:]
    if not os.path.isdir(base):
        return
    depth = None if "**" in rest else len(rest)
    for path, relative, problem in walk(base, "", depth):
        if problem is not None or _matches(rest, relative.split("/")):
            yield path, normalized(path), problem


def _matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


def normalized(path: str) -> str:
    return printable(PurePath(os.path.normpath(path)).as_posix())


def unreadable(source: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{source} does not exist"
    return f"{source} cannot be read: {reason(exc)}"


def reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or type(exc).__name__).lower()
