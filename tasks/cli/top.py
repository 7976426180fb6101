"""`docq top`: every running job and the shared rate limiter, redrawn in place (rich), for
people without Grafana. `--once` prints one frame and exits (scripts, tests, a pipe).

It reads what the status commands read: the store for the jobs (`tasks.api.running_jobs`) and
Redis for the limiter (`tasks.limits.limiter_status`); it writes nothing. Under the jobs, a
`trouble:` line for each shared cause their calls meet (an endpoint unreachable, a refused key,
a storm of 429s, 5xx or timeouts: workers/batch/trouble.py), naming the jobs; while the store
cannot be reached, the live view says so in place of the jobs and goes on redrawing.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from docqueue.tasks.cli.app import cli

if TYPE_CHECKING:
    from docqueue.tasks.records import JobInfo

BAR_WIDTH = 12
PIPE_WIDTH = 120  # a frame written to a pipe or a file: no terminal says how wide


@cli.command()
def top(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option(
        help="Seconds between frames.", min=0.2)] = 2.0,
) -> None:
    """Watch every running job (progress, rate, errors, cost) and the rate limiter (use against
    the limits, calls in flight, cool-down). Ctrl-C ends it."""
    from rich.live import Live

    from docqueue.tasks.progress import Rates
    from docqueue.tasks.runtime import runtime

    settings = runtime().settings
    rates: dict[int, Rates] = {}
    if once:
        Console(width=None if sys.stdout.isatty() else PIPE_WIDTH).print(frame(settings, rates))
        return
    try:
        with Live(live_frame(settings, rates), auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(live_frame(settings, rates), refresh=True)
    except KeyboardInterrupt:
        return


def live_frame(settings: Any, rates: dict[int, Any]) -> Group | Text:
    """A frame; while the store cannot be reached, the trouble line instead (and the view goes
    on). Any other failure is raised: `docq` says it in one line."""
    from docqueue.tasks.records import store_outage
    from docqueue.workers.errors import ServiceUnavailableError

    try:
        return frame(settings, rates)
    except ServiceUnavailableError as exc:
        if (trouble := store_outage(exc)) is None:
            raise
        return Text(f"trouble: {trouble['message']}", style="yellow")


def frame(settings: Any, rates: dict[int, Any]) -> Group:
    """One frame: the jobs table and the limiter's lines. `rates` keeps each job's samples."""
    from docqueue.tasks.api import running_jobs
    from docqueue.tasks.limits import format_limiter_status, limiter_status
    from docqueue.tasks.progress import Rates

    jobs = running_jobs()
    for gone in set(rates) - {j["id"] for j in jobs}:
        del rates[gone]
    return Group(
        jobs_table([rates.setdefault(j["id"], Rates()).add(j) for j in jobs], jobs),
        *(Text(line, style="yellow") for line in trouble_lines(jobs)),
        Text(format_limiter_status(limiter_status(settings))),
    )


def trouble_lines(jobs: list[JobInfo]) -> list[str]:
    """One `trouble:` line per service and cause the jobs meet, naming the jobs: the longest
    running of them speaks for all."""
    shared: dict[tuple[str, str], list[JobInfo]] = {}
    for job in jobs:
        if (t := job.get("trouble")) is not None:
            shared.setdefault((t["service"], t["cause"]), []).append(job)
    lines = []
    for group in shared.values():
        troubles = [j["trouble"] for j in group if j["trouble"] is not None]
        first = max(troubles, key=lambda t: t["for_s"] or 0.0)
        ids = ", ".join(str(j["id"]) for j in group)
        lines.append(f"trouble (job{'s' if len(group) > 1 else ''} {ids}): {first['message']}")
    return lines


def jobs_table(snaps: list[Any], jobs: list[JobInfo]) -> Table | Text:
    from docqueue.tasks.progress import cost_text, duration_text, rate_text

    if not jobs:
        return Text("no running jobs")
    table = Table(title=f"{len(jobs)} running job{'s' if len(jobs) != 1 else ''}",
                  title_justify="left")
    for name in ("job", "pipeline", "progress", "chunks", "errors", "retrying", "rate", "cost",
                 "left"):
        table.add_column(name, no_wrap=True,
                         justify="right" if name in ("chunks", "errors", "retrying") else "left")
    for snap, job in zip(snaps, jobs, strict=True):
        table.add_row(
            str(snap.job_id), str(job["pipeline"]), bar(snap.done, snap.total),
            f"{snap.done:,}/{snap.total:,}",
            str(snap.errors), str(job.get("chunks_retrying") or 0), rate_text(snap.tokens_per_min),
            cost_text(snap.cost), "-" if snap.left_s is None else duration_text(snap.left_s))
    return table


def bar(done: int, total: int) -> str:
    """`████░░░░  30%`: the share of the job's chunks with a final result."""
    share = done / total if total else 0.0
    filled = round(BAR_WIDTH * share)
    return f"{'█' * filled}{'░' * (BAR_WIDTH - filled)} {100 * share:3.0f}%"
