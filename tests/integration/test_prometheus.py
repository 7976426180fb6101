"""Debian's Prometheus scrapes a running stack (a worker and beat), and every query of every
panel of the Grafana dashboard (docker/grafana/dashboards/docqueue.json) returns data.

Needs the `prometheus` binary (`apt-get install -y prometheus`): skipped without it, except
under CI=true, where a missing binary fails. With DOCQ_DASHBOARD_PNG set to a path, the run is
also drawn there, panel by panel (benchmarks/dashboard.py; docs/dashboard.png is one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.dashboard import panels, query, render
from docqueue.tasks import submit
from tests.conftest import free_port
from tests.integration.test_pipeline import corpus

pytestmark = pytest.mark.integration

DOCQ = [sys.executable, "-c", "from docqueue.tasks.cli import main; main()"]


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "no prometheus binary (apt-get install -y prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def wait_for(what: str, check: Callable[[], bool], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{what} not ready after {timeout_s:g} s; {log} ends:\n{log.read_text()[-2000:]}")


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_prometheus_scrapes_workers_and_beat_and_every_dashboard_query_has_data(
    simulator: Any, docq_env: Any, workers: Any, processes: list[Any], tmp_path: Path
) -> None:
    # Given a worker and beat serving /metrics, and Debian's Prometheus scraping both every second
    binary = prometheus_binary()
    sim = simulator("--fail-rate", "0.1", "--latency-ms", "600", "--seed", "5")
    worker_port, beat_port, prom_port = free_port(), free_port(), free_port()
    env = docq_env(sim.url, metrics_port=worker_port, beat_metrics_port=beat_port, llm_rpm=600,
                   llm_tpm=400_000,
                   worker_inflight=1, config=str(tmp_path / "no-schedules.toml"),
                   prices=json.dumps({"docq-sim": {"input_per_mtok": 2.0,
                                                   "output_per_mtok": 8.0}}))
    workers(env, concurrency=2)
    beat_log = tmp_path / "beat.log"
    processes.append(start([*DOCQ, "beat"], beat_log, env))
    wait_for("beat's /metrics", lambda: answers(f"http://127.0.0.1:{beat_port}/metrics"),
             beat_log)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            # `docq worker`'s two processes: the port and the one after it
            {"job_name": "docq-worker", "static_configs": [
                {"targets": [f"127.0.0.1:{worker_port}", f"127.0.0.1:{worker_port + 1}"]}]},
            {"job_name": "docq-beat", "static_configs": [
                {"targets": [f"127.0.0.1:{beat_port}"]}]},
        ]}))
    prom_log = tmp_path / "prometheus.log"
    prom = f"http://127.0.0.1:{prom_port}"
    processes.append(start([binary, f"--config.file={config}",
                            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}"], prom_log))
    wait_for("Prometheus", lambda: answers(f"{prom}/-/ready"), prom_log)
    began = time.time()

    # When a job runs whose first chunks are in the response cache and some calls fail
    docs = corpus(60)
    submit(docs[:5], "summarize").wait(timeout=60)
    handle = submit(docs[5:] + docs[:5], "summarize")  # its last batch is answered from cache
    wanted = {(p.title, t.expr) for p in panels() for t in p.targets}
    answered: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 120
    while answered != wanted and time.monotonic() < deadline:
        for title, expr in wanted - answered:
            if query(prom, "query", query=expr):
                answered.add((title, expr))
        if handle.status()["status"] != "running":
            break
        time.sleep(1)
    handle.wait(timeout=120)

    # Then both targets were up, and every query of every panel returned data while it ran
    up = sorted((r["metric"]["job"], r["value"][1]) for r in query(prom, "query", query="up"))
    assert up == [("docq-beat", "1"), ("docq-worker", "1"), ("docq-worker", "1")]
    hits = query(prom, "query", query="sum(docq_response_cache_hits_total)")
    assert float(hits[0]["value"][1]) == 5
    missing = sorted(wanted - answered)
    assert not missing, f"queries without data: {missing}\n{prom_log.read_text()[-1000:]}"
    if out := os.environ.get("DOCQ_DASHBOARD_PNG"):
        render(prom, began, time.time(), Path(out))
