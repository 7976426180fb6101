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
EXIT_USAGE = 2  # a bad option, input, setting or config file, or an unknown job; nothing done
EXIT_JOB_PARTIAL = 3  # the job ended partial: some chunks failed, the rest have results
EXIT_UNAVAILABLE = 4  # a service (store, broker, model endpoint) is unreachable, refuses the
#                       credentials or is not set up; nothing was done
EXIT_NOT_SENT = 5  # submit: the job is recorded but the broker took none of its batches;
#                    `docq resume JOB` (or beat's reconciler) sends them once it is back
EXIT_INTERNAL = 70  # a fault of docqueue itself (EX_SOFTWARE): `--debug` shows the traceback


@cli.callback()
def _root(
    debug: Annotated[bool, typer.Option(
        "--debug", help="On an error, print the traceback too (or set DOCQ_DEBUG=1).")] = False,
) -> None:
    """Run a language model over a corpus of documents: queued, rate-limited, resumable."""
    # `main()` reads --debug wherever it stands on the command line; this declares it for --help.


def exit_for(status: str) -> typer.Exit | None:
    """The exit a finished job's status calls for; None for a job that succeeded."""
    from docqueue.models import JobStatus

    if status == JobStatus.SUCCEEDED:
        return None
    return typer.Exit(EXIT_JOB_PARTIAL if status == JobStatus.PARTIAL else EXIT_JOB_FAILED)
