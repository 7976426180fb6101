"""A worker's /metrics against the store: what Prometheus would scrape agrees with the results.

A real worker (prefork: two pool processes writing prometheus_client's multiprocess files; or
threads: its main process records and serves) runs a job against the simulator, which answers
some calls with 5xx; its main process serves the sum. Every call is an attempt in the store,
every token a token of a result row.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from docqueue.models import Result
from docqueue.tasks import submit
from docqueue.tasks.runtime import runtime
from tests.conftest import free_port
from tests.integration.test_pipeline import corpus

pytestmark = pytest.mark.integration

PRICE = {"input_per_mtok": 1.5, "output_per_mtok": 4.0}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    want = set(labels.items())
    for (n, ls), v in samples.items():
        if n == name and want <= ls:
            out[dict(ls)[label]] += v
    return dict(out)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_calls_tokens_and_errors_on_metrics_agree_with_the_store(
    simulator: Any, docq_env: Any, workers: Any, pool: str
) -> None:
    # Given a simulator that answers 25% of calls with a 5xx, and a worker serving /metrics
    sim = simulator("--fail-rate", "0.25", "--latency-ms", "150", "--seed", "7")
    port = free_port()
    env = docq_env(sim.url, metrics_port=port, max_attempts=2, worker_inflight=4,
                   prices=json.dumps({"docq-sim": PRICE}))
    workers(env, concurrency=2, pool=pool)

    # When a job runs, the endpoint shows it while it runs
    handle = submit(corpus(30), "summarize", cache="off")
    seen_running = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        samples = scrape(port)
        if total(samples, "docq_job_size_chunks", job_id=str(handle.id)) > 0:
            seen_running = True
        if handle.status()["status"] != "running":
            break
        time.sleep(0.3)
    final = handle.wait(timeout=120)
    samples = scrape(port)

    # Then the counts of the scrape equal the store's
    with runtime().sessions() as s:
        rows = list(s.scalars(select(Result).where(Result.job_id == handle.id)))
    assert seen_running
    assert final["chunks_done"] == final["chunks_total"] == len(rows)
    calls = by_label(samples, "docq_model_calls_total", "outcome", pipeline="summarize")
    ok_rows = [r for r in rows if r.status == "ok"]
    error_rows = [r for r in rows if r.status == "error"]
    assert calls.get("ok", 0) == len(ok_rows) > 0
    assert sum(calls.values()) == sum(r.attempts for r in rows)
    assert calls.get("5xx", 0) == sum(r.attempts for r in rows) - len(ok_rows) > 0
    assert set(calls) <= {"ok", "5xx"}
    assert error_rows and all(r.http_status and r.http_status >= 500 for r in error_rows)
    tokens = by_label(samples, "gen_ai_client_token_usage_sum", "gen_ai_token_type",
                      gen_ai_request_model="docq-sim", pipeline="summarize")
    assert tokens == {"input": sum(r.tokens_in for r in rows),
                      "output": sum(r.tokens_out for r in rows)}
    assert total(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == len(
        ok_rows)
    assert total(samples, "docq_model_cost_usd_total") == pytest.approx(
        sum(r.cost or 0.0 for r in rows), rel=1e-9)
    assert total(samples, "gen_ai_client_operation_duration_seconds_count") == sum(calls.values())
    # and the state read at scrape time is there, the finished job no longer among it
    assert total(samples, "docq_job_size_chunks", job_id=str(handle.id)) == 0
    assert total(samples, "docq_exporter_source_up") == 4
    assert total(samples, "docq_limiter_inflight_cap") == 256
    assert by_label(samples, "docq_queue_depth", "queue") == {"celery": 0, "docq.rescue": 0}
    assert total(samples, "docq_worker_pool_processes") == (2 if pool == "prefork" else 0)
    assert total(samples, "docq_worker_rss_bytes", role="main") > 0
