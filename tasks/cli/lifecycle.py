"""`docq jobs` and `docq purge`: the jobs recorded, and removing finished ones."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer

from docqueue.tasks.cli.app import JsonFlag, cli, fail

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([dhw])\s*$")
_DAYS_PER_UNIT = {"h": 1 / 24, "d": 1.0, "w": 7.0}


def age_in_days(text: str) -> float:
    """`30d`, `12h` or `2w` in days.

    Raises:
        typer.Exit: not such an age (after one error line).
    """
    if (found := _AGE.match(text)) is None:
        raise fail(f"--older-than {text!r}: give an age such as 30d, 12h or 2w")
    return float(found[1]) * _DAYS_PER_UNIT[found[2]]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@cli.command("jobs")
def list_jobs(
    status: Annotated[str | None, typer.Option(
        help="Only jobs in this state: pending, running, succeeded, partial, failed, "
        "cancelled.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
    as_json: JsonFlag = False,
) -> None:
    """List jobs newest first: id, name, status, progress, tokens, cost, created, age."""
    from docqueue.tasks.lifecycle import jobs

    if limit < 1:
        raise fail(f"--limit must be at least 1, not {limit}")
    found = jobs(status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps([j.as_dict() for j in found]))
        return
    if not found:
        typer.echo("no jobs" + (f" in state {status}" if status else ""))
        return
    typer.echo(f"{'ID':>6}  {'NAME':<20} {'STATUS':<10} {'PROGRESS':>15} {'TOKENS':>12} "
               f"{'COST':>10}  {'CREATED':<20} {'AGE':>5}")
    for j in found:
        cost = "-" if j.cost is None else f"${j.cost:.4f}"
        created = (j.created_at or "-")[:19].replace("T", " ")
        typer.echo(f"{j.id:>6}  {(j.name or '-')[:20]:<20} {j.status:<10} "
                   f"{f'{j.chunks_done:,}/{j.chunks_total:,}':>15} {j.tokens:>12,} {cost:>10}  "
                   f"{created:<20} {_age(j.age_s):>5}")


@cli.command()
def purge(
    job_ids: Annotated[list[int] | None, typer.Argument(help="The jobs to remove.")] = None,
    older_than: Annotated[str | None, typer.Option(
        help="Every finished job older than this: 30d, 12h, 2w.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
    cache: Annotated[bool, typer.Option(
        "--cache", help="Also remove the response-cache entries of their chunks.")] = False,
) -> None:
    """Remove finished jobs: their documents, chunks and results (the cache stays)."""
    from docqueue.tasks.lifecycle import ensure_purgeable, purge_jobs
    from docqueue.tasks.lifecycle import older_than as finished_before

    ids = list(job_ids or [])
    if older_than is not None:
        ids += [i for i in finished_before(age_in_days(older_than)) if i not in ids]
    elif not ids:
        raise fail("name the jobs to purge, or give --older-than AGE")
    if not ids:
        typer.echo(f"no finished job is older than {older_than}; nothing to purge")
        return
    ensure_purgeable(ids)  # one line for a running or unknown job, before any question
    what = f"job {ids[0]}" if len(ids) == 1 else f"{len(ids):,} jobs ({_listed(ids)})"
    extra = " and their response-cache entries" if cache else ""
    if not yes and not typer.confirm(f"remove {what} with every document, chunk and "
                                     f"result{extra}?", default=False):
        typer.echo("nothing purged")
        raise typer.Exit(1)
    report = purge_jobs(ids, with_cache=cache)
    cached = f", {report.cache_entries:,} cache entries" if cache else ""
    typer.echo(f"purged {report.jobs:,} jobs: {report.documents:,} documents, "
               f"{report.chunks:,} chunks, {report.results:,} results{cached}")


def _listed(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:10]))
    return shown + (f" and {len(ids) - 10:,} more" if len(ids) > 10 else "")
