"""`docq` commands for jobs and processes: submit, status, results, cancel, retry, worker,
simulate, demo, db upgrade."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from docqueue.tasks.cli.app import JsonFlag, cli, db_cli, exit_for, fail

if TYPE_CHECKING:
    from docqueue.tasks.api import JobHandle
    from docqueue.tasks.records import ChunkResult, JobInfo, ProviderBatchInfo, Trouble
    from docqueue.workers.settings import Settings


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
    pipeline: Annotated[str, typer.Option(
        help="summarize, classify, extract, custom, or openai-batch (one OpenAI Batch file).")] = (
        "summarize"),
    labels: Annotated[str | None, typer.Option(help="classify: comma-separated labels.")] = None,
    schema: Annotated[Path | None, typer.Option(help="extract: a JSON schema file.")] = None,
    prompt: Annotated[Path | None, typer.Option(help="custom: a template file with {text}.")] = (
        None),
    reduce: Annotated[Path | None, typer.Option(
        help="custom: a template file with {text} that answers a group of answers as one.")] = (
        None),
    key: Annotated[str | None, typer.Option(
        help="extract: comma-separated schema fields; objects equal on them merge.")] = None,
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job, showing progress.")] = False,
    cache: Annotated[str, typer.Option(help="use, refresh or off: the response cache.")] = "use",
    budget_tokens: Annotated[int | None, typer.Option(help="Stop calling past this.")] = None,
    budget_cost: Annotated[float | None, typer.Option(help="Stop past this many dollars.")] = (
        None),
    dry_run: Annotated[bool, typer.Option(help="Print the estimated tokens and cost; exit.")] = (
        False),
    lane: Annotated[str, typer.Option(
        help="online (workers call the model) or batch (the provider's Batch API, half price, "
        "sent and polled by `docq beat`).")] = "online",
    batch_fallback: Annotated[str | None, typer.Option(
        help="online: with --lane batch, send the chunks a provider batch leaves unfinished "
        "online once at most --fallback-below are left.")] = None,
    fallback_below: Annotated[int, typer.Option(
        help="The most chunks --batch-fallback sends online (100).")] = 100,
    service_tier: Annotated[str | None, typer.Option(
        help="auto, default or flex: the provider's service tier for online calls (flex: "
        "batch prices, slower, at times unavailable).")] = None,
    text_column: Annotated[str | None, typer.Option(
        help="Tables (.parquet, .csv, .tsv; .jsonl with it): the column of each row's text "
        "(default: text).")] = None,
    id_column: Annotated[str | None, typer.Option(
        help="Tables: the column of each row's id (default: id where there is one).")] = None,
    metadata_columns: Annotated[str | None, typer.Option(
        help="Tables: comma-separated columns kept with each row (default: all others).")] = (
        None),
    as_json: JsonFlag = False,
) -> None:
    """Record documents (files, or the rows of tables) as a job and queue its batches."""
    import os

    from docqueue.tasks.api import submit as do_submit

    # Arrow's default allocator (mimalloc) kept ~25 MiB more of a Parquet file's pages than the
    # system one (benchmarks/bench_tables.py); this process reads and exits, so take the lean one.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

    schema_obj = None
    if (schema_text := _read_option_file(schema, "schema")) is not None:
        try:
            schema_obj = json.loads(schema_text)
        except json.JSONDecodeError as exc:
            raise fail(f"the schema file {schema} is not JSON: {exc}") from None
    options: dict[str, Any] = {
        "labels": [x.strip() for x in labels.split(",") if x.strip()] if labels else None,
        "schema": schema_obj,
        "prompt": _read_option_file(prompt, "prompt"),
        "reduce": _read_option_file(reduce, "reduce"),
        "key": [x.strip() for x in key.split(",") if x.strip()] if key else None,
    }
    if dry_run:
        _print_estimate(paths, pipeline, options, as_json)
        return
    handle = do_submit(paths, pipeline, **options, name=name, cache=cache,
                       budget_tokens=budget_tokens, budget_cost=budget_cost, lane=lane,
                       batch_fallback=batch_fallback, fallback_below=fallback_below,
                       service_tier=service_tier, text=text_column, id=id_column,
                       metadata=[c.strip() for c in metadata_columns.split(",") if c.strip()]
                       if metadata_columns is not None else None)
    report: dict[str, Any] = handle.report.as_dict() if handle.report else {"job_id": handle.id}
    if as_json and not wait:
        typer.echo(json.dumps(report))
    elif not as_json:
        typer.echo(f"job {handle.id}: {report['documents_accepted']} documents accepted, "
                   f"{report['documents_rejected']} rejected; {report['chunks']} chunks in "
                   f"{report['batches']} batches")
        for item in report["rejected"]:
            typer.echo(f"  rejected {item['id']}: {item['error']}")
    if wait:
        from docqueue.tasks.progress import watch

        final = _wait_quietly(handle) if as_json else watch(handle.id)
        if as_json:
            typer.echo(json.dumps({**report, "final": final}))
        else:
            typer.echo(_summary(final))
        if (done := exit_for(final["status"])) is not None:
            raise done


def _print_estimate(paths: list[str], pipeline: str, options: dict[str, Any],
                    as_json: bool) -> None:
    from docqueue.tasks.control import estimate

    est = estimate(paths, pipeline, **options)
    if as_json:
        typer.echo(json.dumps(est))
        return

    def dollars(x: float | None) -> str:
        return "unknown (no price for this model)" if x is None else f"${x:.4f}"

    cached = est["tokens_in_cached"]
    share = f" ({cached} from the prompt cache, {cached / est['tokens_in']:.1%})" if cached else ""
    typer.echo(f"{est['documents']} documents ({est['rejected']} rejected), {est['chunks']} "
               f"chunks\ntokens in: {est['tokens_in']}{share}\ntokens out: at most "
               f"{est['tokens_out_max']}\ncost: {dollars(est['cost_min'])} to "
               f"{dollars(est['cost_max'])}")


def _wait_quietly(handle: JobHandle) -> JobInfo:
    """Wait for the job with nothing on stdout (it gets the JSON): only the trouble lines, on
    stderr."""
    from docqueue.tasks.progress import TroubleLines

    troubles = TroubleLines()

    def say(trouble: Trouble | None) -> None:
        for line in troubles.lines(trouble):
            typer.echo(line, err=True)

    return handle.wait(progress=lambda st: say(st["trouble"]), on_outage=say)


def _progress_line() -> Any:
    from docqueue.tasks.progress import TroubleLines

    last: list[str] = [""]
    troubles = TroubleLines()

    def show(st: JobInfo) -> None:
        steps = f", {st['reduce_steps_done']} reduce steps" if st["reduce_steps_done"] else ""
        line = (f"job {st['id']} {st['status']}: {st['chunks_done']}/{st['chunks_total']} chunks"
                f"{steps}, {st['tokens_in'] + st['tokens_out']} tokens")
        if line != last[0]:
            typer.echo(line, err=True)
            last[0] = line
        for said in troubles.lines(st.get("trouble")):
            typer.echo(said, err=True)

    return show


def _summary(st: JobInfo) -> str:
    """`job 7 partial: 160 ok, 3 failed; tokens in 51,200 (38,400 cached, 75.0%), out 9,600;
    cost $0.0123 (prompt cache saved $0.0040)`, and the reason on a second line when the job
    has one. The prompt cache's words appear only when it served any token."""
    from docqueue.tasks.progress import chunks_in_words

    cost = "unknown" if st["cost"] is None else f"${st['cost']:.4f}"
    rejected = st.get("documents_rejected") or 0
    documents = f"; {rejected:,} documents rejected" if rejected else ""
    text = (f"job {st['id']} {st['status']}: {chunks_in_words(st)}{documents}; tokens in "
            f"{st['tokens_in']:,}{_prompt_cache_words(st)}, out {st['tokens_out']:,}; "
            f"cost {cost}{_saved_words(st)}")
    if st.get("ingesting"):
        text += (f"\n  ingesting: {st['documents_total']:,} documents recorded so far; a "
                 f"producer stopped before the end is finished by `docq resume {st['id']}`")
    elif st.get("reason"):
        text += f"\n  {st['reason']}"
    if trouble := st.get("trouble"):
        text += f"\n  trouble: {trouble['message']}"
    return text + "".join(f"\n  {_provider_batch_line(b)}" for b in st.get("provider_batches", []))


def _prompt_cache_words(st: JobInfo) -> str:
    """` (38,400 cached, 75.0%)`: the prompt tokens the provider read from its prompt cache."""
    return (f" ({st['tokens_in_cached']:,} cached, {st['prompt_cache_share']:.1%})"
            if st["tokens_in_cached"] else "")


def _saved_words(st: JobInfo) -> str:
    """` (prompt cache saved $0.0040)`, when it saved anything and the price is known."""
    saved = st["prompt_cache_saved"]
    return f" (prompt cache saved ${saved:.4f})" if saved else ""


def _provider_batch_line(b: ProviderBatchInfo) -> str:
    """`provider batch batch_ab12 in_progress: 30,000/50,000 done, 12 failed; 2.5 h old`."""
    age_s = b["age_s"]
    age = f"{age_s / 3600:.1f} h" if age_s >= 3600 else f"{age_s / 60:.0f} min" if (
        age_s >= 60) else f"{age_s:.0f} s"
    return (f"provider batch {b['id'] or '(not created yet)'} {b['status'] or b['state']}: "
            f"{b['completed']:,}/{b['requests']:,} done, {b['failed']:,} failed; {age} old")


@cli.command()
def status(
    job: int,
    watch: Annotated[bool, typer.Option(help="Draw live progress until the job ends.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Show a job's state, progress, tokens and cost, and the rate limiter's state."""
    from docqueue.tasks.api import job_status

    if watch and not as_json:
        from docqueue.tasks.progress import watch as watch_job

        st = watch_job(job)
    else:
        st = job_status(job)
    if as_json:
        typer.echo(json.dumps(st))
        return
    typer.echo(_summary(st))
    _echo_limiter()


def _echo_limiter() -> None:
    from docqueue.tasks.limits import format_limiter_status, limiter_status
    from docqueue.tasks.runtime import runtime

    try:
        typer.echo(format_limiter_status(limiter_status(runtime().settings)))
    # A status line must not fail the command: say what is missing.
    except Exception as exc:
        typer.echo(f"rate limiter: unavailable ({type(exc).__name__}: {exc})")


@cli.command()
def results(
    job: int,
    fmt: Annotated[str, typer.Option(
        "--format", help="jsonl, parquet, csv (flat: metadata and output as columns) or "
        "openai-batch.")] = "jsonl",
    output: Annotated[Path | None, typer.Option(
        help="Write here instead of stdout; openai-batch: the prefix of its two files.")] = None,
    level: Annotated[str, typer.Option(
        help="document (one answer each) or chunk (each chunk's own output).")] = "document",
    chunks: Annotated[bool, typer.Option(
        "--chunks", help="One row per chunk (the same as --level chunk).")] = False,
) -> None:
    """Write one record per document: status, merged output, error, tokens, cost.

    A running job's documents are written as they finish: those still waiting are left out.
    """
    from docqueue.tasks.api import chunk_results, document_results, job_status

    if level not in ("document", "chunk"):
        raise fail(f"unknown level {level!r}: choose document or chunk")
    if fmt == "openai-batch":
        _write_openai_batch(job, output)
        return
    if fmt in ("parquet", "csv"):
        from docqueue.tasks.export import write_results

        n = write_results(job, fmt, output, chunks=chunks or level == "chunk")
        if output is not None:
            typer.echo(f"{n:,} rows in {output}")
        return
    if fmt != "jsonl":
        raise fail(f"unknown format {fmt!r}: choose jsonl, parquet, csv or openai-batch")
    level = "chunk" if chunks else level
    job_status(job)  # a clear error for an unknown job
    out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
    try:
        if level == "chunk":
            _write_chunks(chunk_results(job), out)
            return
        for row in document_results(job, finished_only=True):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if output:
            out.close()


def _write_chunks(rows: Iterable[ChunkResult], out: TextIO) -> None:
    out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_openai_batch(job: int, prefix: Path | None) -> None:
    """PREFIX.output.jsonl and PREFIX.errors.jsonl, OpenAI's output and error files."""
    from docqueue.tasks.api import write_openai_batch

    if prefix is None:
        raise fail("--format openai-batch writes two files: give their prefix with --output "
                   "PREFIX (PREFIX.output.jsonl and PREFIX.errors.jsonl)")
    paths = prefix.with_name(prefix.name + ".output.jsonl"), prefix.with_name(
        prefix.name + ".errors.jsonl")
    try:
        ok, failed = write_openai_batch(job, *paths)
    except OSError as exc:
        raise fail(f"cannot write {exc.filename}: {exc.strerror}") from None
    typer.echo(f"{ok} responses in {paths[0]}\n{failed} errors in {paths[1]}")


@cli.command()
def cancel(job: int) -> None:
    """Cancel a job: queued batches close, running ones stop before their next model call."""
    from docqueue.tasks.control import cancel as do_cancel

    if do_cancel(job):
        typer.echo(f"job {job} cancelled; its batches stop and the merge records what was done")
    else:
        typer.echo(f"job {job} had already ended; nothing to cancel")


@cli.command()
def retry(
    job: int,
    include_skipped: Annotated[bool, typer.Option(help="Also budget-skipped chunks.")] = False,
    budget_tokens: Annotated[int | None, typer.Option(help="A new token budget.")] = None,
    budget_cost: Annotated[float | None, typer.Option(help="A new dollar budget.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job again.")] = False,
) -> None:
    """Run a job's failed chunks again as a new chord, then merge the job again."""
    from docqueue.tasks.api import JobHandle
    from docqueue.tasks.control import retry as do_retry

    n = do_retry(job, include_skipped=include_skipped, budget_tokens=budget_tokens,
                 budget_cost=budget_cost)
    typer.echo(f"job {job}: {n} chunks queued again" if n else f"job {job}: nothing to retry")
    if n and wait:
        final = JobHandle(job).wait(progress=_progress_line())
        typer.echo(_summary(final))
        if (done := exit_for(final["status"])) is not None:
            raise done


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int | None, typer.Option(
        "-c", "--concurrency", help="Worker processes (default: one per core); with --pool, "
        "Celery's pool size.")] = None,
    pool: Annotated[str | None, typer.Option(
        "-P", "--pool", help="Unset: one process per core, each running many batches at once "
        "(the default, for every kind of endpoint). prefork or threads: one plain Celery "
        "worker of that pool.")] = None,
    name: Annotated[str, typer.Option(help="Hostname prefix of the worker processes.")] = "docq",
) -> None:
    """Run docqueue's worker processes (extra arguments, such as -Q, go to Celery)."""
    from docqueue.tasks.runtime import runtime
    from docqueue.tasks.supervisor import Supervisor, default_layout

    settings = runtime().settings
    if pool is None:
        logging.basicConfig(level=logging.INFO,
                            format="[%(asctime)s: %(levelname)s/docq worker] %(message)s")
        layout = default_layout(settings, processes=concurrency)
        raise typer.Exit(Supervisor(layout, name=name, extra=ctx.args,
                                    max_memory_mb=settings.worker_max_memory_mb,
                                    on_death=_death_recorder(settings)).run())
    if pool not in ("prefork", "threads"):
        raise typer.BadParameter(f"choose prefork or threads, not {pool!r}", param_hint="--pool")
    from docqueue.tasks.celery import app

    n = concurrency or default_layout(settings).processes
    app.worker_main(["worker", f"--concurrency={n}", f"--pool={pool}", "--events",
                     "--loglevel=INFO", "--without-gossip", *ctx.args])


def _death_recorder(settings: Settings) -> Callable[[int, str], object]:
    """For the supervisor: note a process's death against the batches it was delivering
    (workers/batch/liveness.py), in docqueue's Redis, reached when first needed."""
    import redis

    from docqueue.tasks.runtime import resolve_redis
    from docqueue.workers.batch.liveness import record_death

    clients: list[redis.Redis] = []

    def record(pid: int, cause: str) -> object:
        if not clients:
            clients.append(redis.Redis.from_url(resolve_redis(settings), socket_timeout=5,
                                                socket_connect_timeout=5))
        return record_death(clients[0], pid, cause)

    return record


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def simulate(ctx: typer.Context) -> None:
    """Run the provider simulator (`docq simulate --help` for its options)."""
    from docqueue.workers.testing.simulator import main as simulator_main

    raise typer.Exit(simulator_main(list(ctx.args)))


@cli.command()
def demo(
    fresh: Annotated[bool, typer.Option(help="Process the corpus again even if stored.")] = False,
) -> None:
    """Summarize the bundled example corpus with the local model, start to finish."""
    from rich.console import Console

    from docqueue.tasks.demo import run_demo

    final = run_demo(Console(), fresh=fresh)
    if (done := exit_for(final["status"])) is not None:
        raise done


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's tables."""
    from docqueue.models import upgrade
    from docqueue.tasks.runtime import runtime

    upgrade(runtime().settings.database_url)
    typer.echo("the results store is up to date")
