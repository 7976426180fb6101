"""`docq` commands for recovery: resume a job whose messages or workers were lost; see workers."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from docqueue.tasks.cli.app import JsonFlag, cli, fail

# Celery is imported inside the commands: `docq --help` stays fast and opens nothing.


@cli.command()
def resume(
    job: Annotated[int | None, typer.Argument(help="A job id; without it, every open job.")] = (
        None),
    as_json: JsonFlag = False,
) -> None:
    """Queue again what a job lost (worker killed, Redis lost) and merge it when it is done.

    With JOB: every unfinished batch of the job that no live worker holds is sent again, and a
    job whose chunks all have a final result is merged. Without: the reconciler's rules run once
    over every open job (what the beat task does each minute). Running it twice is harmless.

    A job whose producer died mid-submit (still ingesting): its path inputs are read again, the
    documents it recorded are skipped, and the rest is recorded and published; a job submitted
    from an in-memory iterable cannot be read again, and says so. Only once that producer is
    gone: a live one would record the same documents twice.
    """
    from docqueue.tasks.lane import resume_lane
    from docqueue.tasks.maintenance import reconcile

    ingesting = job is not None and _check_resumable(job)
    records = reconcile(None if job is None else [job], force=job is not None, merge_inline=True)
    if ingesting:
        assert job is not None
        records.append(_resume_ingest(job))
    lane = resume_lane(None if job is None else [job])
    if as_json:
        typer.echo(json.dumps(records + lane))
        return
    if not records and not lane:
        typer.echo("no open jobs")
    for r in records:
        typer.echo(_resume_line(r))
    for r in lane:
        typer.echo(_lane_line(r))


def _check_resumable(job_id: int) -> bool:
    """Whether the job's ingestion is to be resumed; exits when there is nothing to do."""
    from docqueue.models import Job, JobStatus
    from docqueue.tasks.api import producer_alive
    from docqueue.tasks.runtime import runtime

    with runtime().sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise fail(f"job {job_id} does not exist")
        if job.ingesting and job.status in (JobStatus.PENDING, JobStatus.RUNNING):
            if (holder := producer_alive(job_id)) is not None:
                raise fail(f"job {job_id} is still being recorded by its producer ({holder}): "
                           "wait for that `docq submit` to end, or stop it, then resume")
            if job.inputs is None:
                raise fail(f"job {job_id} stopped ingesting before the end, and its inputs were "
                           "an in-memory iterable that cannot be read again: submit the rest of "
                           "its documents as a new job")
            return True
        if job.status == JobStatus.PENDING:
            raise fail(f"job {job_id} was never fully submitted (status pending): "
                       f"submit its documents again")
        if job.status not in (JobStatus.RUNNING, JobStatus.CANCELLED) or (
                job.status == JobStatus.CANCELLED and job.finished_at is not None):
            typer.echo(f"job {job_id} is {job.status}: nothing to resume")
            raise typer.Exit(0)
    return False


def _resume_ingest(job_id: int) -> dict[str, Any]:
    from docqueue.tasks.api import resume_ingest
    from docqueue.workers.errors import WorkerError

    try:
        report = resume_ingest(job_id)
    except WorkerError as exc:
        raise fail(str(exc)) from None
    documents = report.documents_accepted + report.documents_rejected
    return {"job_id": job_id, "resent": 0, "in_progress": 0, "merged": None,
            "ingested": {"documents": documents, "chunks": report.chunks},
            "reason": f"ingestion resumed: {documents:,} more documents recorded, "
                      f"{report.chunks:,} chunks, published"}


def _resume_line(r: dict[str, Any]) -> str:
    parts = []
    if r["resent"]:
        parts.append(f"sent {r['resent']} batches again")
    if r["in_progress"]:
        parts.append(f"{r['in_progress']} batches in progress under a live lease")
    if r["merged"]:
        parts.append(f"merged: {r['merged']}" if r["merged"] != "queued" else "merge queued")
    if not parts:
        parts.append("nothing to do")
    return f"job {r['job_id']}: {'; '.join(parts)} ({r['reason']})"


def _lane_line(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"job {r['job_id']}: {r['skipped']}"
    done = (f"job {r['job_id']} (batch lane): {r['sent']} provider batches sent, {r['closed']} "
            f"closed, {r['recorded']} results recorded, {r['cached']} from the cache")
    return done + (f"; merged: {r['merged']}" if r.get("merged") else "")


@cli.command()
def workers(as_json: JsonFlag = False) -> None:
    """Show each worker process's memory (RSS) against DOCQ_WORKER_MAX_MEMORY_MB."""
    from docqueue.tasks.maintenance import format_worker_memory, worker_memory
    from docqueue.tasks.runtime import runtime

    rows = worker_memory(runtime().settings)
    typer.echo(json.dumps(rows) if as_json else format_worker_memory(rows))
