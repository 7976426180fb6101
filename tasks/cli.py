"""`docq`: submit corpora, watch jobs, read results, run workers and the simulator."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from workers.errors import WorkerError

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


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _read_option_file(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read the {what} file {path}: {exc.strerror}") from None


@cli.command()
def submit(
    paths: Annotated[list[str], typer.Argument(help="Files, directories or globs.")],
    pipeline: Annotated[str, typer.Option(help="summarize, classify, extract or custom.")] = (
        "summarize"),
    labels: Annotated[str | None, typer.Option(help="classify: comma-separated labels.")] = None,
    schema: Annotated[Path | None, typer.Option(help="extract: a JSON schema file.")] = None,
    prompt: Annotated[Path | None, typer.Option(help="custom: a template file with {text}.")] = (
        None),
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job, showing progress.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Record documents as a job and queue its batches."""
    from tasks.api import submit as do_submit

    schema_obj = None
    if (schema_text := _read_option_file(schema, "schema")) is not None:
        try:
            schema_obj = json.loads(schema_text)
        except json.JSONDecodeError as exc:
            raise fail(f"the schema file {schema} is not JSON: {exc}") from None
    handle = do_submit(
        paths, pipeline,
        labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None,
        schema=schema_obj, prompt=_read_option_file(prompt, "prompt"), name=name,
    )
    report = handle.report.as_dict() if handle.report else {"job_id": handle.id}
    if as_json and not wait:
        typer.echo(json.dumps(report))
    elif not as_json:
        typer.echo(f"job {handle.id}: {report['documents_accepted']} documents accepted, "
                   f"{report['documents_rejected']} rejected; {report['chunks']} chunks in "
                   f"{report['batches']} batches")
        for item in report["rejected"]:
            typer.echo(f"  rejected {item['id']}: {item['error']}")
    if wait:
        final = handle.wait(progress=None if as_json else _progress_line())
        if as_json:
            typer.echo(json.dumps({**report, "final": final}))
        else:
            typer.echo(_summary(final))


def _progress_line() -> Any:
    last: list[str] = [""]

    def show(st: dict[str, Any]) -> None:
        line = (f"job {st['id']} {st['status']}: {st['chunks_done']}/{st['chunks_total']} chunks"
                f", {st['tokens_in'] + st['tokens_out']} tokens")
        if line != last[0]:
            typer.echo(line, err=True)
            last[0] = line

    return show


def _summary(st: dict[str, Any]) -> str:
    cost = "unknown" if st["cost"] is None else f"${st['cost']:.4f}"
    text = (f"job {st['id']} {st['status']}: {st['chunks_by_state']} "
            f"tokens in {st['tokens_in']} out {st['tokens_out']}, cost {cost}")
    return text + (f"\n  {st['reason']}" if st.get("reason") else "")


@cli.command()
def status(job: int, as_json: JsonFlag = False) -> None:
    """Show a job's state, progress, tokens and cost."""
    from tasks.api import job_status

    st = job_status(job)
    typer.echo(json.dumps(st) if as_json else _summary(st))


@cli.command()
def results(
    job: int,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Write one record per document: status, merged output, error, tokens, cost."""
    from tasks.api import document_results, job_status

    if fmt not in ("jsonl", "csv"):
        raise fail(f"unknown format {fmt!r}: choose jsonl or csv")
    job_status(job)  # a clear error for an unknown job
    out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        rows = document_results(job)
        if fmt == "jsonl":
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            fields = ["id", "source", "status", "output", "error", "chunks", "tokens_in",
                      "tokens_out", "cost", "content_hash"]
            writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                row["output"] = json.dumps(row["output"], ensure_ascii=False)
                writer.writerow(row)
    finally:
        if output:
            out.close()


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int | None, typer.Option("-c", "--concurrency")] = None,
) -> None:
    """Run a Celery worker with docqueue's defaults (extra arguments go to Celery)."""
    from tasks.celery import app
    from tasks.runtime import runtime

    n = concurrency or runtime().settings.worker_concurrency
    app.worker_main(["worker", f"--concurrency={n}", "--pool=prefork", "--events",
                     "--loglevel=INFO", "--without-gossip", *ctx.args])


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def simulate(ctx: typer.Context) -> None:
    """Run the provider simulator (`docq simulate --help` for its options)."""
    from workers.simulator import main as simulator_main

    raise typer.Exit(simulator_main(list(ctx.args)))


@cli.command()
def demo(
    fresh: Annotated[bool, typer.Option(help="Process the corpus again even if stored.")] = False,
) -> None:
    """Summarize the bundled example corpus with the local model, start to finish."""
    from rich.console import Console

    from tasks.demo import run_demo

    run_demo(Console(), fresh=fresh)


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's tables."""
    from models import upgrade
    from tasks.runtime import runtime

    upgrade(runtime().settings.database_url)
    typer.echo("the results store is up to date")


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


# Commands of other areas register themselves on `cli` when imported.
from tasks import cli_operate, cli_recover  # noqa: F401
