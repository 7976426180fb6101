"""`docq` commands for operating docqueue: schedules, beat, Flower, live progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from docqueue.tasks.cli.app import EXIT_UNAVAILABLE, JsonFlag, cli, fail
from docqueue.workers.clock import utc_now

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@cli.command()
def check() -> None:
    """Check the settings: reach the results store, the broker, docqueue's Redis and the model
    endpoint.

    One line each on stdout when it works; an `error:` line on stderr for each that does not,
    and exit status 4.
    """
    from docqueue.models import store_id
    from docqueue.tasks.failures import broker_name, explain, redis_name, scrub, store_name
    from docqueue.tasks.publish import check_broker, check_redis
    from docqueue.tasks.runtime import resolve_endpoint, runtime
    from docqueue.workers.provider.probe import probe_endpoint
    from docqueue.workers.settings import masked_url

    settings = runtime().settings
    failed = False

    def attempt(what: str, step: Any) -> None:
        nonlocal failed
        try:
            detail = step()
        except Exception as exc:
            failed = True
            mapped = explain(exc, settings)
            typer.echo(scrub(f"error: {mapped or exc}", settings), err=True)
            return
        typer.echo(scrub(f"{what}: ok{detail}", settings))

    def store() -> str:
        with runtime().sessions() as session:
            store_id(session)
        return ""

    def endpoint() -> str:
        base = resolve_endpoint(settings)
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        found = probe_endpoint(base, api_key=key, model=settings.model_name,
                               timeout_s=min(settings.llm_timeout_s, 10.0))
        listed = f", serving {settings.model_name}" if found.models else ""
        return f" ({masked_url(base)}{listed})"

    def broker() -> str:
        check_broker(settings)
        return " (RabbitMQ)" if not settings.broker_is_redis else " (Redis)"

    def state() -> str:
        check_redis(settings)
        if settings.redis_url:
            return ""
        if settings.broker_url:
            return " (the broker's; DOCQ_REDIS_URL is unset)"
        return " (the embedded one; DOCQ_REDIS_URL and DOCQ_BROKER_URL are unset)"

    attempt(store_name(settings), store)
    attempt(broker_name(settings), broker)
    attempt(redis_name(settings) if settings.redis_url else "docqueue's Redis", state)
    attempt("the model endpoint", endpoint)
    if failed:
        raise typer.Exit(EXIT_UNAVAILABLE)


@cli.command()
def schedules(as_json: JsonFlag = False) -> None:
    """List the schedules of DOCQ_CONFIG with their last and next runs."""
    from docqueue.tasks.beat import config_path
    from docqueue.tasks.runtime import runtime
    from docqueue.workers.jobs.schedule_runs import last_runs
    from docqueue.workers.jobs.schedules import ScheduleError, load_schedules, missing_source

    rt = runtime()
    path = config_path(rt.settings)
    if not path.exists():
        typer.echo("[]" if as_json else f"no schedule file at {path} (DOCQ_CONFIG)")
        return
    try:
        found = load_schedules(path, check_sources=False)
    except ScheduleError as exc:
        raise fail(str(exc)) from None
    with rt.sessions() as session:
        runs = last_runs(session, [s.name for s in found])
    now = utc_now()
    rows = [{
        "name": s.name, "source": s.source, "pipeline": s.pipeline,
        "options": _shown_options(s.options), "cron": s.cron.expr, "timezone": s.cron.timezone,
        "next_run": s.cron.next_after(now).isoformat(), "last_run": runs.get(s.name),
        "problem": missing_source(s.source),
    } for s in found]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no schedules in {path}")
    for row in rows:
        typer.echo(_schedule_lines(row))


def _shown_options(options: dict[str, Any]) -> dict[str, Any]:
    shown = dict(options)
    if "prompt" in shown:  # a template can be long and private: say only that it is there
        shown["prompt"] = f"({len(str(shown['prompt']))} characters)"
    return shown


def _schedule_lines(row: dict[str, Any]) -> str:
    lines = [(f"{row['name']}: {row['pipeline']} over {row['source']}, "
              f"cron '{row['cron']}' {row['timezone']}, next run {row['next_run']}")]
    if row["problem"]:
        lines.append(f"  problem: {row['problem']}")
    last = row["last_run"]
    if last is None:
        lines.append("  last run: never")
    else:
        from docqueue.workers.jobs.schedule_runs import run_state

        state = run_state(last["status"], last["job_status"])
        job = ""
        if last["job_id"]:
            job = f" (job {last['job_id']}" + (
                ")" if last["job_status"] == state else f" {last['job_status'] or 'deleted'})")
        lines.append(
            f"  last run: window {last['window_start']} {state}{job}: "
            f"{last['documents_seen']} seen, {last['documents_new']} new, "
            f"{last['documents_changed']} changed, {last['documents_unchanged']} unchanged, "
            f"{last['documents_rejected']} unreadable")
        if last["reason"]:
            lines.append(f"  {last['reason']}")
    return "\n".join(lines)


@cli.command(context_settings=_PASS_THROUGH)
def beat(ctx: typer.Context) -> None:
    """Run Celery beat: the schedules of DOCQ_CONFIG, the reconciler and the batch lane's poll
    (extra arguments go to Celery beat)."""
    from docqueue.tasks.beat import beat_entries, config_path
    from docqueue.tasks.celery import app
    from docqueue.tasks.lane import poll_entry
    from docqueue.tasks.lifecycle import retention_entry
    from docqueue.tasks.maintenance import reconcile_entry
    from docqueue.tasks.runtime import runtime
    from docqueue.workers.jobs.schedules import ScheduleError, load_schedules

    settings = runtime().settings
    path = config_path(settings)
    found = []
    if path.exists():
        try:
            found = load_schedules(path)
        except ScheduleError as exc:
            raise fail(str(exc)) from None
    else:
        typer.echo(f"no schedule file at {path} (DOCQ_CONFIG): beat runs the reconciler and "
                   "the batch lane's poll only", err=True)
    app.conf.beat_schedule = {**beat_entries(found), "jobs-reconcile": reconcile_entry(settings),
                              "lane-poll": poll_entry(settings), **retention_entry(settings)}
    now = utc_now()
    for s in found:
        typer.echo(f"schedule {s.name}: cron '{s.cron.expr}' {s.cron.timezone}, "
                   f"next run {s.cron.next_after(now).isoformat()}", err=True)
    home = Path(settings.home)
    home.mkdir(parents=True, exist_ok=True)
    app.start(["beat", f"--schedule={home / 'celerybeat-schedule'}", "--loglevel=INFO",
               *ctx.args])


@cli.command(context_settings=_PASS_THROUGH)
def flower(
    ctx: typer.Context,
    address: Annotated[str | None, typer.Option(
        help="Address to bind (default DOCQ_FLOWER_ADDRESS, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Port (default DOCQ_FLOWER_PORT, 5555).")] = None,
    url_prefix: Annotated[str | None, typer.Option(
        help="Serve under this path, behind a reverse proxy.")] = None,
    max_tasks: Annotated[int, typer.Option(help="Tasks Flower keeps in memory.")] = 10_000,
    insecure_local: Annotated[bool, typer.Option(
        "--insecure-local", help="Serve without credentials; loopback addresses only.")] = False,
) -> None:
    """Run Flower with credentials from DOCQ_FLOWER_USER and DOCQ_FLOWER_PASSWORD (extra
    arguments go to Flower)."""
    from docqueue.tasks.flower import FlowerAuthError, run_flower
    from docqueue.tasks.runtime import runtime

    settings = runtime().settings
    try:
        run_flower(
            settings, address=settings.flower_address if address is None else address,
            port=settings.flower_port if port is None else port, insecure_local=insecure_local,
            url_prefix=url_prefix, max_tasks=max_tasks, extra_args=list(ctx.args),
        )
    except FlowerAuthError as exc:
        raise fail(str(exc)) from None
