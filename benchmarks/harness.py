"""What the end-to-end benchmarks share: worker processes, a fresh results store, a private Redis
DB, the machine description and the table and JSON output.

Benchmarks run as scripts (`python benchmarks/bench_x.py`); each puts the project root first on
sys.path before importing this module.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import redis
from sqlalchemy import create_engine, text

from docqueue.models import upgrade
from docqueue.tasks.worker_process import WorkerProcess
from docqueue.workers.batch.calls import prompt_tokens
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.tokens import count_tokens

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_PG_URL = os.environ.get("DOCQ_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


class CpuMeter:
    """CPU seconds used by each part of the system between start() and stop().

    A part is a function listing its processes, asked again at stop(): server backends and
    pool processes that start during the run count from zero.
    """

    def __init__(self, parts: dict[str, Callable[[], list[psutil.Process]]]) -> None:
        self.parts = parts
        self.before: dict[str, dict[int, float]] = {}

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> dict[int, float]:
        out = {}
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    def start(self) -> None:
        self.before = {name: self._cpu(list_procs()) for name, list_procs in self.parts.items()}

    def stop(self) -> dict[str, float]:
        used = {}
        for name, list_procs in self.parts.items():
            after, before = self._cpu(list_procs()), self.before[name]
            used[name] = sum(t - before.get(pid, 0.0) for pid, t in after.items())
        return used


def servers(name: str) -> list[psutil.Process]:
    """The running processes whose name starts with `name` (a server's backends)."""
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(name)]


def start_worker(env: dict[str, str], log: Path, name: str, concurrency: int,
                 pool: str = "prefork") -> WorkerProcess:
    """One worker process with its pool children, without task events (as measured so far)."""
    return WorkerProcess(env, log, name=name, concurrency=concurrency, pool=pool, events=False)


@contextmanager
def results_store(pg_url: str, sqlite: bool, workdir: Path) -> Iterator[str]:
    """A fresh, migrated results store: a PostgreSQL schema (dropped after) or a SQLite file."""
    if sqlite:
        url = f"sqlite:///{workdir}/docq-{uuid.uuid4().hex[:8]}.db"
        upgrade(url)
        yield url
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = f"{pg_url}?options={quote(f'-csearch_path={schema}')}"
        upgrade(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def check_redis(url: str) -> redis.Redis:
    """The benchmark's Redis DB, flushed; refuse to run if another client is using it."""
    client = redis.Redis.from_url(url)
    client.ping()
    db = client.connection_pool.connection_kwargs.get("db", 0)
    mine = {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("tcp")
            if c.raddr}
    others = [c for c in client.client_list() if int(c["db"]) == db and c["addr"] not in mine]
    if others:
        sys.exit(f"error: Redis DB {db} at {url} is in use by {len(others)} other client(s); "
                 "the benchmark needs it to itself")
    client.flushdb()
    return client


# Common one-token words for generated corpora.
_VOCABULARY = (
    "harbour boat quay market morning tide rope net catch fish gull storm sail crew "
    "lighthouse keeper village council budget library school bridge river mill bakery "
    "oven bread winter summer festival music square train station ticket platform "
    "journey mountain valley forest path garden tomato soup recipe salt pepper onion "
    "garlic research sleep memory study result team data measure year month week day "
    "battery charge cell energy engine design test field farm weather rain wind sun"
)
WORDS = _VOCABULARY.split()


def one_chunk_corpus(n: int, seed: int, tokens: int, label: str,
                     name: str) -> tuple[list[tuple[str, str]], int]:
    """n documents of exactly `tokens` + 1 tokens (one chunk each, every call the same charge),
    named `name`-0, -1, ..., each opening "`label` i:"; and the prompt tokens of each call."""
    rng = random.Random(seed)
    pipe = build_pipeline("summarize", {})
    docs: list[tuple[str, str]] = []
    sizes: set[int] = set()
    while len(docs) < n:
        # Most words are one token: take nearly enough at once, then one at a time.
        words = [f"{label} {len(docs)}:", *rng.choices(WORDS, k=tokens - 12)]
        while count_tokens(" ".join(words)) < tokens:
            words.append(rng.choice(WORDS))
        body = " ".join(words) + "."
        if count_tokens(body) != tokens + 1:
            continue  # a word that split into two tokens overshot: draw this document again
        docs.append((f"{name}-{len(docs)}", body))
        sizes.add(prompt_tokens(pipe.render(body, "chat")))
    assert len(sizes) == 1, sizes
    return docs, sizes.pop()


def wait_for_job(job_id: int, timeout_s: float, log: Path, poll_s: float = 0.1) -> None:
    """Block until the job is merged in a final state; a light poll of the job row only.

    Raises:
        SystemExit: not done within `timeout_s` (the message names the worker log).
    """
    from sqlalchemy import select

    from docqueue.models import FINAL_JOB_STATES as TERMINAL
    from docqueue.models import Job
    from docqueue.tasks.runtime import runtime

    deadline = time.monotonic() + timeout_s
    while True:
        with runtime().sessions() as s:
            status, finished = s.execute(
                select(Job.status, Job.finished_at).where(Job.id == job_id)).one()
        if status in TERMINAL and finished is not None:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} not done after {timeout_s:g}s; see {log}")
        time.sleep(poll_s)


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load": [round(x, 2) for x in os.getloadavg()]}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Right-aligned columns: (row key, heading) pairs."""
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    heads = [head for _, head in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json, with the machine description added."""
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
    return path
