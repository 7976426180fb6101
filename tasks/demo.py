"""`docq demo`: the bundled corpus through the whole pipeline on one machine, nothing to set up.

It starts what is missing (the embedded Redis, the local model, one worker), submits
the bundled corpus (`workers/local/corpus`), shows progress and a table of results, and stops
what it started. A second run finds the first run's job for the same corpus in the store and
shows it at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from docqueue.models import Document, DocumentStatus, Job, JobStatus, upgrade
from docqueue.tasks.runtime import reset_runtime, runtime
from docqueue.workers.clock import monotonic_s
from docqueue.workers.ingest.sources import iter_documents
from docqueue.workers.local import DEMO_CORPUS

if TYPE_CHECKING:
    from docqueue.tasks.records import JobInfo
    from docqueue.workers.local.model import LocalModelServer

CORPUS = DEMO_CORPUS
DEMO_NAME = "docq demo"
WORKER_READY_S = 120
STALL_S = 120.0  # no chunk finished for this long: the demo stops and says so


def run_demo(console: Console, corpus: Path = CORPUS, fresh: bool = False) -> JobInfo:
    """Run (or show again) the demo job; returns its final status."""
    from docqueue.tasks.api import JobHandle, submit

    if not corpus.is_dir():
        raise RuntimeError(f"the demo corpus {corpus} is missing: run the demo from a checkout "
                           "of docqueue (pip install -e .)")
    settings = runtime().settings
    upgrade(settings.database_url)
    if not fresh and (job_id := _previous_run(corpus)) is not None:
        console.print(f"[green]job {job_id} already holds this corpus's results[/] "
                      "(run with --fresh to process it again)")
        handle = JobHandle(job_id)
        final = handle.status()
        _show(console, handle.id, final)
        return final
    with _services(console) as (env, supervisor), _worker(console, env):
        started = monotonic_s()
        handle = submit(str(corpus), "summarize", name=DEMO_NAME)
        report = handle.report
        assert report is not None
        console.print(f"job {handle.id}: {report.documents_accepted} documents, "
                      f"{report.chunks} chunks; summarizing with the local model...")
        final = handle.wait(timeout=1800, progress=_progress(console, supervisor),
                            stall_s=STALL_S)
        console.print(f"done in {monotonic_s() - started:.1f}s")
    _show(console, handle.id, final)
    return final


def _previous_run(corpus: Path) -> int | None:
    """The latest finished demo job whose documents have the corpus's current content."""
    hashes = {d.external_id: d.content_hash
              for d in iter_documents([str(corpus)], max_bytes=10**7) if d.ok}
    with runtime().sessions() as session:
        job_id = session.scalar(
            select(Job.id).where(Job.name == DEMO_NAME, Job.status == JobStatus.SUCCEEDED)
            .order_by(Job.id.desc()).limit(1))
        if job_id is None:
            return None
        stored = dict(session.execute(
            select(Document.external_id, Document.content_hash)
            .where(Document.job_id == job_id)).all())
    return job_id if stored == hashes else None


@contextlib.contextmanager
def _services(console: Console) -> Iterator[tuple[dict[str, str], ModelSupervisor | None]]:
    """Start the embedded Redis and the local model if the settings name none.

    Yields the environment every process the demo starts gets (the store and home as absolute
    paths, so a worker started elsewhere opens the same store), and the model's supervisor.
    """
    settings = runtime().settings
    env = {"DOCQ_DATABASE_URL": settings.database_url, "DOCQ_HOME": str(settings.home)}
    supervisor = None
    with contextlib.ExitStack() as stack:
        if settings.state_redis_url is None:  # neither DOCQ_BROKER_URL nor DOCQ_REDIS_URL
            from docqueue.workers.local.embedded_redis import EmbeddedRedis

            redis = stack.enter_context(EmbeddedRedis(settings.home))
            env["DOCQ_BROKER_URL"] = redis.url
            console.print(f"embedded Redis at {redis.url}")
        if not settings.llm_base_url:
            from docqueue.workers.local.model import LocalModelServer

            console.print("starting the local model (Gemma 3 270M)...")
            model = LocalModelServer(settings.home).start()
            supervisor = stack.enter_context(ModelSupervisor(console, model))
            env.update(DOCQ_LLM_BASE_URL=model.url, DOCQ_LLM_MODE="completion",
                       DOCQ_LLM_MODEL=model.model_name, DOCQ_WORKER_INFLIGHT="2")
            console.print(f"local model at {model.url}")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        reset_runtime()  # this process now talks to what was started
        try:
            yield env, supervisor
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            reset_runtime()


class ModelSupervisor:
    """Watches the local model server this process started: names its end within a second,
    restarts it once on the same port, and after a second death fails the demo with the reason.

    While the server is down the worker's calls find the port closed; such calls are not
    attempts (nothing was sent), so the chunks wait instead of failing.
    """

    POLL_S = 0.5
    RESTART_AFTER_S = 2.0

    def __init__(self, console: Console, server: LocalModelServer, restarts: int = 1) -> None:
        self.console, self.server, self.restarts_left = console, server, restarts
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-supervisor", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.server.stop()

    def check(self) -> None:
        """Raise if the server is gone for good.

        Raises:
            LocalModelError: the server died and was not (or could not be) restarted.
        """
        if self.failure is not None:
            from docqueue.workers.local.model import LocalModelError

            raise LocalModelError(self.failure)

    def _watch(self) -> None:
        from docqueue.workers.local.model import LocalModelServer

        while not self._stop.wait(self.POLL_S):
            report = self.server.exit_report()
            if report is None:
                continue
            headline, _, log = report.partition("\n")
            self.console.print(f"[red]{headline}[/]", highlight=False)
            self.console.print(log, style="dim", highlight=False, markup=False)
            if self.restarts_left <= 0:
                self.failure = f"{headline}; it was restarted once already, so the demo stops"
                return
            self.restarts_left -= 1
            self.console.print(f"restarting it in {self.RESTART_AFTER_S:g} s (once); the "
                               "chunks wait meanwhile")
            if self._stop.wait(self.RESTART_AFTER_S):
                return
            port, home = self.server.port, self.server.state_dir.parent
            self.server.stop()
            try:
                self.server = LocalModelServer(home, port=port).start()
            except Exception as exc:
                self.failure = f"{headline}; restarting it failed: {exc}"
                return
            self.console.print(f"the local model is back at {self.server.url}")


@contextlib.contextmanager
def _worker(console: Console, env: dict[str, str]) -> Iterator[None]:
    from docqueue.tasks.worker_process import WorkerProcess

    worker = WorkerProcess(env, runtime().settings.home / "demo-worker.log", name="demo",
                           concurrency=1)
    try:
        worker.wait_ready(WORKER_READY_S)
        console.print("a worker is running; watch it in Flower with "
                      "`docq flower --insecure-local` (http://127.0.0.1:5555)")
        yield
    finally:
        worker.stop()


def _progress(console: Console, supervisor: ModelSupervisor | None) -> Any:
    last = [-1]

    def show(st: JobInfo) -> None:
        if supervisor is not None:
            supervisor.check()
        done = st["chunks_done"] + st["reduce_steps_done"]
        if done != last[0]:
            last[0] = done
            steps = f", {st['reduce_steps_done']} reduce steps" if st["reduce_steps_done"] else ""
            console.print(f"  {st['chunks_done']}/{st['chunks_total']} chunks{steps}, "
                          f"{st['tokens_in'] + st['tokens_out']} tokens")

    return show


def _show(console: Console, job_id: int, final: JobInfo) -> None:
    from docqueue.tasks.api import document_results

    table = Table(title=f"job {job_id}: {final['status']}", show_lines=False)
    for col in ("document", "status", "summary", "tokens in", "tokens out"):
        table.add_column(col, overflow="fold")
    for d in document_results(job_id):
        ok = d["status"] == DocumentStatus.OK
        summary = (d["output"] or {}).get("summary", "") if ok else d["error"]
        table.add_row(d["id"], d["status"], summary or "", str(d["tokens_in"]),
                      str(d["tokens_out"]))
    console.print(table)
    line = f"tokens in {final['tokens_in']}, out {final['tokens_out']}"
    if final.get("latency_p50_ms") is not None:
        line += f"; model latency p50 {final['latency_p50_ms']:.0f} ms"
    if final.get("chunks_per_s") is not None:
        line += f"; {final['chunks_per_s']:.2f} chunks/s"
    console.print(line)
