"""`docq`: submit corpora, watch jobs, read results, run workers and the simulator.

Each module of this package registers its commands on the one app of `tasks/cli/app.py` when
imported; this module imports them all and runs the app. No command module imports this one.
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from tasks.cli import jobs, operate, recover  # noqa: F401  (they register their commands)
from tasks.cli.app import cli
from workers.errors import WorkerError

__all__ = ["cli", "main"]


def main() -> None:
    try:
        cli()
    except (WorkerError, LookupError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        typer.echo(f"error: invalid setting {where}: {first['msg']}", err=True)
        sys.exit(2)
