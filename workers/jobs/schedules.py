"""Schedules: corpora declared in a TOML file, re-read on cron windows, ingesting only changes.

A schedule file (`DOCQ_CONFIG`, default `docq.toml`) holds `[[schedule]]` tables:

    [[schedule]]
    name = "news"                    # unique; names the runs, the lock and the baseline
    source = "corpus/news"           # a directory, a file or a glob, relative to the file
    pipeline = "classify"
    options = { labels = ["sport", "politics"] }   # labels, schema and prompt, as for submit
    cron = "30 2 * * 1-5"            # five fields: minute hour day-of-month month day-of-week
    timezone = "Europe/Berlin"       # an IANA zone; UTC when left out

Each firing is a window, named by its start (the fire time, in UTC); one row per
(schedule, window) in `schedule_runs` decides which process runs it. A run reads the source,
compares every document's content hash with the schedule's baseline (`schedule_documents`),
and submits only the new and changed documents.

The baseline moves when a run succeeds: when its job ended `succeeded` or `partial`, the
documents of that job that ended `ok` join the baseline with their hashes. Documents that
failed, and every document of a failed or cancelled job, stay out, so the next run tries them
again. A run whose job is still going makes the next windows skip, so no document is sent
twice while its first job runs.

Cron semantics are cron's (croniter): day-of-month and day-of-week restricted together mean
either; in the zone's autumn repeated hour a fixed-time schedule (minute and hour without `*`)
fires once, a wildcard one at each occurrence; a time skipped in spring fires at the jump.

The parts: this module reads the schedule file; `cron.py` holds the cron windows,
`schedule_runs.py` a run's rows and its comparison with the baseline.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from docqueue.workers.errors import InputError, PipelineError
from docqueue.workers.jobs.cron import Cron
from docqueue.workers.pipelines import build_pipeline

SCHEDULE_KEYS = frozenset({"name", "source", "pipeline", "options", "cron", "timezone"})
OPTION_KEYS = frozenset({"labels", "schema", "prompt"})
MAX_NAME_CHARS = 200  # ScheduleRun.schedule is a String(200)
_GLOB_MAGIC = frozenset("*?[")


class ScheduleError(InputError):
    """A schedule file or one of its schedules is unusable; the message names it."""


@dataclass(frozen=True)
class Schedule:
    name: str
    source: str  # absolute: a relative source is taken from the schedule file's directory
    pipeline: str
    cron: Cron
    options: dict[str, Any] = field(default_factory=dict)


def load_schedules(path: Path, *, check_sources: bool = True) -> list[Schedule]:
    """Read and check every schedule of the file at `path`.

    Raises:
        ScheduleError: the file cannot be read or parsed, or a schedule is unusable (bad cron
            or zone, unknown pipeline or options, a source that does not exist); the message
            names the file and the schedule.
    """
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ScheduleError(f"cannot read the schedule file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScheduleError(f"the schedule file {path} is not valid TOML: {exc}") from None
    if unknown := sorted(set(data) - {"schedule"}):
        raise ScheduleError(f"{path}: unknown key {unknown[0]!r}; schedules go in [[schedule]]")
    tables = data.get("schedule", [])
    if not isinstance(tables, list):
        raise ScheduleError(f"{path}: 'schedule' must be an array of tables ([[schedule]])")
    schedules: list[Schedule] = []
    for number, table in enumerate(tables, 1):
        schedule = _schedule(path, number, table, check_sources)
        if any(s.name == schedule.name for s in schedules):
            raise ScheduleError(f"{path}: two schedules are named {schedule.name!r}")
        schedules.append(schedule)
    return schedules


def find_schedule(schedules: Iterable[Schedule], name: str, path: Path) -> Schedule:
    """The schedule called `name`.

    Raises:
        ScheduleError: no schedule of that name in the file at `path`.
    """
    for schedule in schedules:
        if schedule.name == name:
            return schedule
    raise ScheduleError(f"{path} has no schedule named {name!r}")


def _schedule(path: Path, number: int, table: Any, check_sources: bool) -> Schedule:
    where = f"{path}: schedule #{number}"
    if not isinstance(table, dict):
        raise ScheduleError(f"{where} is not a table")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise ScheduleError(f"{where} needs a 'name': a string of 1 to {MAX_NAME_CHARS} characters")
    where = f"{path}: schedule {name!r}"
    if unknown := sorted(set(table) - SCHEDULE_KEYS):
        raise ScheduleError(f"{where}: unknown key {unknown[0]!r} "
                            f"(known: {', '.join(sorted(SCHEDULE_KEYS))})")
    text: dict[str, str] = {}
    for key in ("source", "pipeline", "cron", "timezone"):
        value = table.get(key, "UTC" if key == "timezone" else None)
        if not isinstance(value, str) or not value.strip():
            raise ScheduleError(f"{where} needs {key!r} as a non-empty string")
        text[key] = value
    try:
        cron = Cron.parse(text["cron"], text["timezone"])
    except ValueError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ScheduleError(f"{where}: 'options' must be a table")
    if unknown := sorted(set(options) - OPTION_KEYS):
        raise ScheduleError(f"{where}: unknown option {unknown[0]!r} "
                            f"(known: {', '.join(sorted(OPTION_KEYS))})")
    try:
        build_pipeline(text["pipeline"], options)
    except PipelineError as exc:
        raise ScheduleError(f"{where}: {exc}") from None
    source = os.path.abspath(path.parent / text["source"])  # an absolute one stays as it is
    if check_sources and (problem := missing_source(source)):
        raise ScheduleError(f"{where}: {problem}")
    return Schedule(name, source, text["pipeline"], cron, dict(options))


def missing_source(source: str) -> str | None:
    """Why `source` cannot be read as a file, a directory or a glob, or None if it can."""
    parts = PurePath(source).parts
    magic = [i for i, part in enumerate(parts) if _GLOB_MAGIC.intersection(part)]
    if not magic:
        return None if Path(source).exists() else f"the source {source} does not exist"
    base = Path(*parts[: magic[0]])
    if not base.is_dir():
        return f"the source {source} is a glob under {base}, which is not a directory"
    return None
