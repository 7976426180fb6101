"""`docq`: submit corpora, watch jobs, read results, run workers and the simulator.

Each module of this package registers its commands on the one app of `tasks/cli/app.py` when
imported; this module imports them all and runs the app. No command module imports this one.

Every failure ends as one line on stderr, `error: ...`, and an exit status of its kind (the
constants in tasks/cli/app.py, listed in the README): a usage error never prints Click's usage
block, a driver's exception is named by the service it failed to reach (tasks/failures.py), and
no configured secret is printed. `--debug` (anywhere on the line) or DOCQ_DEBUG=1 adds the
traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from pydantic import ValidationError
from typer.exceptions import Abort, TyperException

from docqueue.tasks.cli import jobs, lifecycle, operate, recover, top  # noqa: F401  (they register their commands)
from docqueue.tasks.cli.app import (
    EXIT_INTERNAL,
    EXIT_JOB_FAILED,
    EXIT_NOT_SENT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    cli,
)
from docqueue.workers.errors import JobNotPublishedError, ServiceUnavailableError, WorkerError
from docqueue.workers.settings import Settings, settings_problem

__all__ = ["cli", "main"]

DEBUG_FLAG = "--debug"
HELP_FLAGS = frozenset({"--help", "-h"})


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` belongs to the command (celery's own options, say).
    head, sep, tail = _split(args)
    debug = DEBUG_FLAG in head or os.environ.get("DOCQ_DEBUG", "").lower() in ("1", "true", "yes")
    args = [a for a in head if a != DEBUG_FLAG] + sep + tail
    try:
        if head and not HELP_FLAGS & set(head):
            # Every command refuses settings docqueue cannot run with, before it starts anything
            # (a worker would otherwise restart a crashing process every second).
            Settings()
        code = cli(args=args, prog_name="docq", standalone_mode=False)
    except TyperException as exc:  # Click's usage errors, as Typer carries them
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
        else:
            _report(_usage_line(exc), exc, debug=False)
        code = EXIT_USAGE
    except Abort:
        typer.echo("error: interrupted", err=True)
        code = 130
    except Exception as exc:
        code, line = _failure(exc)
        _report(line, exc, debug=debug)
        if code == EXIT_INTERNAL and not debug:
            typer.echo("  (a fault of docqueue: run again with --debug and report the traceback)",
                       err=True)
    sys.exit(code if isinstance(code, int) else 0)


def _split(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    if "--" in args:
        i = args.index("--")
        return args[:i], ["--"], args[i + 1:]
    return args, [], []


def _failure(exc: Exception) -> tuple[int, str]:
    """The exit status and the line for an exception a command let out."""
    from docqueue.tasks.failures import explain
    from docqueue.workers.local.embedded_redis import EmbeddedServiceError

    if isinstance(exc, ValidationError):
        return EXIT_USAGE, settings_problem(exc)
    settings = _settings()
    if (mapped := explain(exc, settings)) is not None:
        exc = mapped
    if isinstance(exc, JobNotPublishedError):
        return EXIT_NOT_SENT, str(exc)
    if isinstance(exc, ServiceUnavailableError | EmbeddedServiceError):
        return EXIT_UNAVAILABLE, str(exc)
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "JobStalledError":
        return EXIT_JOB_FAILED, str(exc)
    if isinstance(exc, WorkerError | LookupError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, RuntimeError) and str(exc).startswith("no model endpoint"):
        return EXIT_UNAVAILABLE, str(exc)
    first = str(exc).splitlines()[0] if str(exc) else "no message"
    return EXIT_INTERNAL, f"unexpected {type(exc).__name__}: {first}"


def _report(line: str, exc: BaseException, *, debug: bool) -> None:
    from docqueue.tasks.failures import scrub

    settings = _settings()
    if debug:
        text = "".join(traceback.format_exception(exc))
        typer.echo(scrub(text, settings).rstrip(), err=True)
    typer.echo(scrub(f"error: {line}", settings), err=True)


def _usage_line(exc: TyperException) -> str:
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message[:1].lower() + message[1:]


_cached: list[Settings | None] = []


def _settings() -> Settings | None:
    """The settings, for masking and naming; None when they cannot be read."""
    if not _cached:
        try:
            _cached.append(Settings())
        except Exception:
            _cached.append(None)
    return _cached[0]
