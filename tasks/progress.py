"""A job's progress in the terminal: a live rich bar on a terminal, plain lines otherwise.

`watch(job_id)` polls the job's status until it is final and returns that status. The bar
shows chunks done of total, errors, tokens per minute and chunks per second over the last
minute, the cost so far and the time left at that pace.

While the job's calls fail for a shared cause, or the view's own polls cannot reach the store
or docqueue's Redis, a `trouble:` line says what, for how long and what docqueue does about it
(workers/batch/trouble.py): under the bar for as long as it lasts; as plain lines when it
starts or changes, every TROUBLE_EVERY_S while it lasts and once more (`trouble cleared:`) when
it is over. A poll the store fails is such a line too, and the view goes on polling.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Self

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.text import Text

from docqueue.models import FINAL_JOB_STATES, ResultStatus
from docqueue.tasks.api import JobHandle, JobInfo
from docqueue.workers.batch.trouble import Trouble, cleared
from docqueue.workers.clock import monotonic_s

RATE_WINDOW_S = 60.0
PLAIN_EVERY_S = 5.0  # a plain line at most this often while the counts move
TROUBLE_EVERY_S = 10.0  # a plain trouble line again at most this often while it lasts


@dataclass(frozen=True)
class Snapshot:
    """What one progress line says."""

    job_id: int
    status: str
    done: int
    total: int
    errors: int
    tokens: int
    tokens_per_min: float | None
    cost: float | None
    left_s: float | None

    def line(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"job {self.job_id} {self.status}: {self.done}/{self.total} chunks{pct}",
                 f"{self.errors} errors", rate_text(self.tokens_per_min), cost_text(self.cost)]
        if self.left_s is not None and self.status not in FINAL_JOB_STATES:
            parts.append(f"about {duration_text(self.left_s)} left")
        return ", ".join(parts)


class Rates:
    """Throughput over the last minute of samples: tokens per minute and time left."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int, int]] = deque()  # (time, chunks done, tokens)

    def add(self, status: Mapping[str, Any], now: float | None = None) -> Snapshot:
        now = monotonic_s() if now is None else now
        done = int(status["chunks_done"])
        tokens = int(status["tokens_in"]) + int(status["tokens_out"])
        self.samples.append((now, done, tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        total = int(status["chunks_total"])
        tpm = left = None
        t0, done0, tokens0 = self.samples[0]
        if now - t0 > 0:
            tpm = (tokens - tokens0) * 60.0 / (now - t0)
            per_s = (done - done0) / (now - t0)
            if per_s > 0:
                left = max(total - done, 0) / per_s
        return Snapshot(
            job_id=int(status["id"]), status=str(status["status"]), done=done, total=total,
            errors=int(status["chunks_by_state"].get(ResultStatus.ERROR, 0)), tokens=tokens,
            tokens_per_min=tpm, cost=status.get("cost"), left_s=left,
        )


def watch(job_id: int, *, interval_s: float = 1.0, out: IO[str] | None = None) -> JobInfo:
    """Show the job's progress on `out` (stdout) until it is final; returns its final status.

    Raises:
        JobNotFoundError: the job does not exist.
    """
    out = out if out is not None else sys.stdout
    view: _LiveBar | _PlainLines = _LiveBar(out) if out.isatty() else _PlainLines(out)
    with view:
        return JobHandle(job_id).wait(poll_s=interval_s, progress=view.update,
                                      on_outage=view.outage)


class TroubleLines:
    """A job's trouble as lines for a log (or a pipe): `trouble: ...` when it starts or its
    cause changes, again every TROUBLE_EVERY_S while it lasts, `trouble cleared: ...` once when
    it is over."""

    def __init__(self) -> None:
        self.current: Trouble | None = None
        self.seen_at = self.said_at = 0.0

    def lines(self, trouble: Trouble | None, now: float | None = None) -> list[str]:
        now = monotonic_s() if now is None else now
        last, self.current = self.current, trouble
        if trouble is None:
            if last is None:
                return []
            lasted = last["for_s"] + now - self.seen_at if last["for_s"] is not None else None
            return [f"trouble cleared: {cleared(last, lasted)}"]
        self.seen_at = now
        same = last is not None and (last["cause"], last["service"]) == (
            trouble["cause"], trouble["service"])
        if same and now - self.said_at < TROUBLE_EVERY_S:
            return []
        self.said_at = now
        return [f"trouble: {trouble['message']}"]


class _PlainLines:
    """One line when the counts move (at most every few seconds) and one when the state does;
    the trouble lines of `TroubleLines`."""

    def __init__(self, out: IO[str]) -> None:
        self.out, self.rates, self.troubles = out, Rates(), TroubleLines()
        self.last_line, self.last_status, self.last_t = "", "", 0.0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.out.flush()

    def update(self, status: JobInfo) -> None:
        snap = self.rates.add(status)
        now = monotonic_s()
        # The trouble first: a `trouble cleared:` line belongs before the counts it let move.
        lines = self.troubles.lines(status.get("trouble"), now)
        moved = snap.line() != self.last_line and now - self.last_t >= PLAIN_EVERY_S
        if snap.status != self.last_status or moved:
            lines.append(snap.line())
            self.last_line, self.last_status, self.last_t = snap.line(), snap.status, now
        self._write(lines)

    def outage(self, trouble: Trouble) -> None:
        """A poll failed: the store is out of reach (JobHandle.wait's `on_outage`)."""
        self._write(self.troubles.lines(trouble))

    def _write(self, lines: list[str]) -> None:
        self.out.writelines(line + "\n" for line in lines)
        self.out.flush()


class _TroubledProgress(Progress):
    """A rich Progress with the trouble line (if any) under its bar."""

    trouble = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        if self.trouble:
            yield Text(f"trouble: {self.trouble}", style="yellow")


class _LiveBar:
    """A rich progress bar, redrawn at each poll, with the trouble line under it."""

    def __init__(self, out: IO[str]) -> None:
        self.rates = Rates()
        self.progress = _TroubledProgress(
            TextColumn("[bold]job {task.fields[job]}[/] {task.fields[status]}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} chunks"),
            TextColumn("{task.fields[errors]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[cost]}"),
            TextColumn("{task.fields[left]}"),
            console=Console(file=out), auto_refresh=False,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.refresh()
        self.progress.stop()

    def update(self, status: JobInfo) -> None:
        snap = self.rates.add(status)
        fields: dict[str, Any] = {
            "job": snap.job_id, "status": snap.status,
            "errors": f"{snap.errors} errors", "rate": rate_text(snap.tokens_per_min),
            "cost": cost_text(snap.cost),
            "left": "" if snap.left_s is None or snap.status in FINAL_JOB_STATES
            else f"{duration_text(snap.left_s)} left",
        }
        if self.task is None:
            self.task = self.progress.add_task("job", total=snap.total or None, **fields)
        self.progress.update(self.task, completed=snap.done, total=snap.total or None, **fields)
        trouble = status.get("trouble")
        self.progress.trouble = trouble["message"] if trouble else ""
        self.progress.refresh()

    def outage(self, trouble: Trouble) -> None:
        """A poll failed: the store is out of reach (JobHandle.wait's `on_outage`)."""
        self.progress.trouble = trouble["message"]
        self.progress.refresh()


# How each result state reads in a sentence, in the order a summary lists them.
_STATE_WORDS = ((ResultStatus.OK, "ok"), (ResultStatus.ERROR, "failed"),
                (ResultStatus.SKIPPED_BUDGET, "skipped (budget spent)"),
                (ResultStatus.CANCELLED, "cancelled"))


def chunks_in_words(status: Mapping[str, Any]) -> str:
    """A job's chunks by state as a phrase: `160 ok, 3 failed, 2 retrying, 5 waiting`."""
    by_state = dict(status["chunks_by_state"])
    parts = [f"{by_state.pop(state):,} {words}" for state, words in _STATE_WORDS
             if by_state.get(state)]
    parts += [f"{n:,} {state.replace('_', ' ')}" for state, n in sorted(by_state.items()) if n]
    retrying = int(status.get("chunks_retrying") or 0)
    if retrying:
        parts.append(f"{retrying:,} retrying")
    waiting = int(status["chunks_total"]) - int(status["chunks_done"]) - retrying
    if waiting > 0:
        parts.append(f"{waiting:,} waiting")
    return ", ".join(parts) if parts else "no chunks"


def rate_text(tpm: float | None) -> str:
    return "- tokens/min" if tpm is None else f"{tpm:,.0f} tokens/min"


def cost_text(cost: float | None) -> str:
    return "cost unknown" if cost is None else f"${cost:.4f}"


def duration_text(seconds: float) -> str:
    s = round(seconds)
    if s < 1:
        return "<1s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
