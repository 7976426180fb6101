"""Keeping jobs moving through crashes: the rescuer, the reconciler, and each worker's memory.

`rescue()` sends again, at once, the batches of deliveries whose heartbeat is gone (a worker
killed or frozen: workers/batch/liveness.py). Every worker's main process runs it every
DOCQ_HEARTBEAT_S seconds on its own timer, so a dead worker's batches go on within seconds of its
heartbeat's TTL whether or not beat runs; any number of rescuers send each batch once.

`reconcile()` runs the rules of workers/jobs/reconcile.py over the store and Redis, and acts on
them: it sends lost batches again as a new chord and merges finished jobs nobody merged. The
beat task `jobs.reconcile` runs it (after a rescue) every DOCQ_RECONCILE_EVERY_S seconds
(`reconcile_entry`, for the beat schedule); `docq resume` runs it by hand.

Memory: Celery replaces a pool process whose RSS passed `worker_max_memory_per_child` once its
task is done (tasks/celery.py sets it from DOCQ_WORKER_MAX_MEMORY_MB). Here a new pool process
warns when it is born too close to that limit (celery#4125), and each worker's main process
publishes its own and its pool processes' RSS to a Redis hash every few seconds, which
`worker_memory()` reads for `docq workers`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import psutil
import redis
from celery import bootsteps
from celery.signals import task_received, worker_process_init, worker_ready, worker_shutdown
from celery.worker import state as worker_state

from docqueue.tasks.batches import reservation_tag
from docqueue.tasks.celery import app, state_redis
from docqueue.tasks.jobs import merge_job
from docqueue.tasks.publish import publish
from docqueue.tasks.runtime import resolve_redis, runtime
from docqueue.workers import keys
from docqueue.workers.batch.liveness import (
    Delivery,
    beat_worker,
    dead_deliveries,
    dead_reservations,
    held_batches,
    rescued,
    reserve,
    stale_reservations,
    take_rescue,
)
from docqueue.workers.clock import wall_s
from docqueue.workers.jobs.reconcile import (
    abandoned_batches,
    forget_abandoned,
    mark_published,
    open_jobs,
    plan_job,
    published,
    rescue_targets,
)
from docqueue.workers.settings import Settings

logger = logging.getLogger(__name__)

LOCK_KEY, LOCK_TTL_S = keys.RECONCILE_LOCK, 300
RSS_KEY = keys.WORKERS_RSS
RSS_EVERY_S = 5.0
RSS_STALE_S = 4 * RSS_EVERY_S  # an entry not refreshed for this long is a worker that is gone


def reconcile_entry(settings: Settings) -> dict[str, Any]:
    """The beat entry for `jobs.reconcile`; a tick that waited a whole period is dropped."""
    every_s = settings.reconcile_every_s
    return {"task": "jobs.reconcile", "schedule": every_s, "options": {"expires": every_s}}


def rescue() -> dict[int, int]:
    """Send again the batches whose delivery's heartbeat is gone; per job id, batches sent.

    A dead delivery is rescued under a lock taken by one rescuer and forgotten once its batch
    is sent, so concurrent rescuers send it once, and one killed before sending leaves it to
    the next after `RESCUE_LOCK_S`.
    """
    rt = runtime()
    client = state_redis()
    ttl_s = rt.settings.heartbeat_ttl_s
    dead = dead_deliveries(client, ttl_s) + dead_reservations(client, ttl_s)
    mine = [d for d in dead if take_rescue(client, d)]
    return _send_again(client, mine, "their deliveries' heartbeat is gone (worker killed or "
                                     "frozen)")


def _send_again(client: Any, deliveries: list[Delivery], why: str) -> dict[int, int]:
    """Send the batches of dead deliveries or reservations again; per job id, batches sent."""
    if not deliveries:
        return {}
    with runtime().sessions.begin() as session:
        targets = rescue_targets(session, {d.batch_id for d in deliveries})
    sent: dict[int, int] = {}
    for job_id, batch_ids in targets.items():
        sent[job_id] = publish(job_id, batches=batch_ids)
        logger.warning("job %s: sent %d batches again at once: %s: %s", job_id, sent[job_id],
                       why, ", ".join(map(str, batch_ids)))
    rescued(client, deliveries)
    return sent


def reconcile(
    job_ids: Sequence[int] | None = None,
    *,
    force: bool = False,
    merge_inline: bool = False,
    merge_grace_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Send lost batches again and merge finished jobs; one record per open job examined.

    `force` sends every unfinished batch nobody is working on (`docq resume JOB`).
    `merge_inline` merges in this process instead of queueing `jobs.merge`.
    """
    rt = runtime()
    client = state_redis()
    with rt.sessions.begin() as session:
        jobs = open_jobs(session, job_ids)
    marked = published(client, [j.job_id for j in jobs])
    # Orphans (`plan_job`): asked of the broker only when some batch could be one. A batch a
    # worker took and finished since the store was read is sent to no one: `publish` sends
    # open batches only.
    maybe_orphans = not force and any(
        marked[j.job_id] and any(b.unfinished and not b.leased for b in j.batches) for j in jobs)
    queues_empty = maybe_orphans and broker_queues_empty()
    held = held_batches(client, rt.settings.heartbeat_ttl_s) if queues_empty else None
    abandoned = abandoned_batches(client)
    # A dead delivery's message comes back after one visibility timeout; a second one is the
    # time it may wait in the queue before we call it lost.
    lost_after_s = 2.0 * rt.settings.visibility_timeout_s
    records: list[dict[str, Any]] = []
    resent: set[int] = set()
    waiting: set[int] = set()  # open batches not sent again: an abandoned one among them stays
    for job in jobs:
        plan = plan_job(job, published=marked[job.job_id], force=force,
                        lost_after_s=lost_after_s, merge_grace_s=merge_grace_s,
                        abandoned=abandoned, queues_empty=queues_empty, held=held,
                        settle_s=rt.settings.reconcile_every_s)
        record: dict[str, Any] = {"job_id": job.job_id, "reason": plan.reason,
                                  "resent": 0, "in_progress": plan.in_progress, "merged": None}
        resent.update(plan.resend)
        waiting.update(b.batch_id for b in job.batches
                       if b.unfinished and b.batch_id not in plan.resend)
        if plan.resend:
            record["resent"] = publish(job.job_id, batches=plan.resend)
            logger.warning("job %s: sent %d batches again (%s)", job.job_id, record["resent"],
                           plan.reason)
        elif not marked[job.job_id] and not job.all_final:
            mark_published(client, job.job_id)  # the live deliveries carry the rest
        if plan.merge:
            logger.info("job %s: merging (%s)", job.job_id, plan.reason)
            if merge_inline:
                record["merged"] = merge_job(job.job_id)["status"]
            else:
                merge_job.delay(job.job_id)
                record["merged"] = "queued"
        records.append(record)
    # An abandoned batch is forgotten once sent again or, when every open job was examined,
    # once it is no longer open (finished, or its job closed).
    forget_abandoned(client, abandoned & resent if job_ids else abandoned - waiting)
    return records


def broker_queues_empty() -> bool:
    """Whether every queue of ours is empty now (messages received by a worker not counted).
    Raises the broker's error when it cannot be reached (tasks/failures.py names it)."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        return all(queue.bind(channel).queue_declare().message_count == 0
                   for queue in app.conf.task_queues)


@app.task(name="jobs.reconcile")
def reconcile_jobs() -> dict[str, Any]:
    """Beat: find lost batches and unmerged jobs, and enqueue what finishes them."""
    client = state_redis()
    if not client.set(LOCK_KEY, str(os.getpid()), nx=True, ex=LOCK_TTL_S):
        return {"skipped": "another reconcile is running"}
    try:
        rescue()
        # A job that just finished is merged by its own chord callback; give it one period.
        records = reconcile(merge_grace_s=runtime().settings.reconcile_every_s)
    finally:
        client.delete(LOCK_KEY)
    return {
        "jobs": len(records),
        "merged": [r["job_id"] for r in records if r["merged"]],
        "resent": {str(r["job_id"]): r["resent"] for r in records if r["resent"]},
    }


# -- memory ---------------------------------------------------------------------------------------


def baseline_warning(rss_mb: float, limit_mb: float) -> str | None:
    """A warning when a new pool process starts above half the memory limit, else None."""
    if limit_mb <= 0 or rss_mb <= limit_mb / 2:
        return None
    return (
        f"a new worker process starts at {rss_mb:.0f} MB, over half of "
        f"DOCQ_WORKER_MAX_MEMORY_MB={limit_mb:.0f}: it will be replaced after almost every "
        f"batch (celery#4125). Raise the limit, or keep the worker's main process lean"
    )


@worker_process_init.connect
def _check_baseline(**_: Any) -> None:
    limit_mb = runtime().settings.worker_max_memory_mb
    warning = baseline_warning(_rss_mb(psutil.Process()), limit_mb)
    if warning:
        logger.warning("pid %s: %s", os.getpid(), warning)


def _rss_mb(proc: psutil.Process) -> float:
    return float(proc.memory_info().rss) / 2**20


class _RssReporter:
    """In a worker's main process: publish its RSS and its pool processes' on the event loop."""

    def __init__(self, hostname: str, limit_mb: float) -> None:
        self.hostname, self.limit_mb = hostname, limit_mb
        self.fields: set[str] = set()

    def publish(self) -> None:
        main = psutil.Process()
        entries: dict[str, str] = {}
        now = wall_s()
        for role, proc in [("main", main)] + [("pool", c) for c in main.children()]:
            try:
                rss_mb = _rss_mb(proc)
            except psutil.Error:  # a pool process that just exited
                continue
            entries[f"{self.hostname}:{proc.pid}"] = json.dumps({
                "hostname": self.hostname, "pid": proc.pid, "role": role,
                "rss_mb": round(rss_mb, 1), "limit_mb": self.limit_mb, "updated": now,
            })
        client = state_redis()
        gone = self.fields - entries.keys()
        if gone:
            client.hdel(RSS_KEY, *gone)
        client.hset(RSS_KEY, mapping=entries)
        self.fields = set(entries)

    def safe_publish(self) -> None:
        try:
            self.publish()
        except (redis.RedisError, psutil.Error, OSError) as exc:
            # A report lost to a Redis hiccup is replaced by the next one; the worker goes on.
            logger.warning("worker %s: cannot publish memory use: %s", self.hostname, exc)

    def forget(self) -> None:
        if self.fields:
            state_redis().hdel(RSS_KEY, *self.fields)


_reporter: _RssReporter | None = None


@worker_ready.connect
def _start_rss_reports(sender: Any, **_: Any) -> None:
    global _reporter
    _reporter = _RssReporter(sender.hostname, runtime().settings.worker_max_memory_mb)
    _reporter.safe_publish()
    # The main process's event-loop timer: no thread in a process that forks pool processes.
    sender.timer.call_repeatedly(RSS_EVERY_S, _reporter.safe_publish)


class _Rescuer:
    """In a worker's main process: vouch for its received messages, and rescue dead peers'."""

    def __init__(self, hostname: str, batches: int) -> None:
        self.hostname, self.batches = hostname, batches

    def tick(self) -> None:
        try:
            beat_worker(state_redis(), self.hostname, runtime().settings.heartbeat_ttl_s,
                        self.batches)
            rescue()
        except Exception as exc:
            logger.warning("worker %s: heartbeat or rescue failed: %s: %s", self.hostname,
                           type(exc).__name__, exc)


@worker_ready.connect
def _start_rescues(sender: Any, **_: Any) -> None:
    # On the main process's timer, like the memory reports: a worker is its own rescuer, so a
    # `docq worker` without `docq beat` still recovers a dead peer's batches in seconds.
    # The sender is the worker's consumer; its controller knows the pool's size
    rescuer = _Rescuer(sender.hostname, int(sender.controller.concurrency or 1))
    rescuer.tick()
    sender.timer.call_repeatedly(runtime().settings.heartbeat_s, rescuer.tick)


class ResendLostReservations(bootsteps.StartStopStep):  # type: ignore[misc]  # celery: no types
    """A consumer step: each time a worker's consumer starts (at start-up, and again after the
    broker's connection was lost), it sends again the batches reserved under its name that no
    running task holds, and forgets those reservations. Celery forgot the messages with the
    connection (the broker gives them back later, or lost them with Redis), or a former worker
    of the same name died with them; the worker's live heartbeat must not vouch for them. A
    late copy from the broker is absorbed by the leases like any duplicate."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        keep = {reservation_tag(r.id, r.request_dict.get("retries"))
                for r in worker_state.active_requests}
        try:
            client = state_redis()
            stale = [d for d in stale_reservations(client, c.hostname, keep)
                     if take_rescue(client, d)]
            _send_again(client, stale, f"worker {c.hostname} had received them before this "
                        "start (its broker connection was lost, or a former worker of its name "
                        "died)")
        except Exception as exc:  # the visibility timeout and the reconciler still cover them
            logger.warning("worker %s: cannot send its lost reservations again: %s: %s",
                           c.hostname, type(exc).__name__, exc)


app.steps["consumer"].add(ResendLostReservations)


@task_received.connect
def _reserve_batch(request: Any, **_: Any) -> None:
    # In the main process, as the message arrives: until a pool process starts it, only this
    # worker's heartbeat stands for it (a pool process can take seconds to start).
    if request.name != "batches.process" or not request.args:
        return
    try:
        reserve(state_redis(), reservation_tag(request.id, request.request_dict.get("retries")),
                int(request.args[0]), request.hostname)
    except redis.RedisError as exc:  # Redis's visibility timeout still covers the message
        logger.warning("batch %s: cannot record its reservation: %s", request.args[0], exc)


@worker_shutdown.connect
def _stop_rss_reports(**_: Any) -> None:
    if _reporter is not None:
        _reporter.forget()


def worker_memory(settings: Settings) -> list[dict[str, Any]]:
    """Each live worker process's RSS: hostname, pid, role (main or pool), rss_mb, limit_mb."""
    client = redis.Redis.from_url(resolve_redis(settings), socket_timeout=10,
                                  socket_connect_timeout=5)
    try:
        entries = client.hgetall(RSS_KEY)
        now = wall_s()
        rows, stale = [], []
        for field, raw in entries.items():
            row = json.loads(raw)
            if now - float(row["updated"]) > RSS_STALE_S:
                stale.append(field)  # its worker stopped reporting: it is gone
            else:
                rows.append({**row, "age_s": round(now - float(row["updated"]), 1)})
        if stale:
            client.hdel(RSS_KEY, *stale)
    finally:
        client.close()
    return sorted(rows, key=lambda r: (r["hostname"], r["role"] != "main", r["pid"]))


def format_worker_memory(rows: list[dict[str, Any]]) -> str:
    """A table of `worker_memory()` rows, one line per process."""
    if not rows:
        return f"no worker has reported its memory in the last {RSS_STALE_S:.0f} s"
    lines = [f"{'worker':<32} {'pid':>7} {'role':<5} {'rss MB':>8} {'limit MB':>9}  {'% limit':>7}"]
    for r in rows:
        limit = float(r["limit_mb"])
        share = f"{100 * r['rss_mb'] / limit:6.0f}%" if limit > 0 and r["role"] == "pool" else ""
        lines.append(f"{r['hostname']:<32} {r['pid']:>7} {r['role']:<5} {r['rss_mb']:>8.1f} "
                     f"{limit if limit > 0 else 'off':>9}  {share:>7}")
    return "\n".join(lines)
