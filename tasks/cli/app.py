"""The `docq` Typer app and what every command module shares; it imports no command module."""

from __future__ import annotations

from typing import Annotated

import typer

cli = typer.Typer(
    name="docq",
    help="Run a language model over a corpus of documents: queued, rate-limited, resumable.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_cli = typer.Typer(help="The results store.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fail(message: str, code: int = 2) -> typer.Exit:  # EXIT_USAGE
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# Exit statuses, the same for every command (the README lists them).
EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job ended failed or cancelled (or did not end: stalled, timed out)
EXIT_USAGE = 2  # a bad option, input or setting; nothing was done
EXIT_JOB_PARTIAL = 3  # the job ended partial: some chunks failed, the rest have results


def exit_for(status: str) -> typer.Exit | None:
    """The exit a finished job's status calls for; None for a job that succeeded."""
    if status == "succeeded":
        return None
    return typer.Exit(EXIT_JOB_PARTIAL if status == "partial" else EXIT_JOB_FAILED)
