"""`--service-tier` on the online lane: sent to the provider, priced by tier, flex's 429s waited
out."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from docqueue.models import Result
from docqueue.tasks import submit
from docqueue.tasks.runtime import runtime
from tests.integration.test_batch_lane import SHAPE, corpus, wait_final

pytestmark = pytest.mark.integration


def test_a_flex_job_waits_out_resource_unavailable_and_costs_batch_prices(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider whose flex tier refuses a third of its requests
    sim = simulator("--seed", "11", "--flex-unavailable-rate", "0.33")
    env = docq_env(sim.url, **SHAPE)
    workers(env, concurrency=1)
    # When a job runs online at the flex tier
    job = submit(corpus(30), "summarize", cache="off", service_tier="flex")
    st = wait_final(job.id, 120)
    # Then it succeeds: the refusals (which only flex requests get) were waits, not attempts
    assert st["status"] == "succeeded", st
    by_status = sim.stats()["by_status"]
    assert by_status["429"] > 0
    assert by_status["200"] == st["chunks_total"]
    with runtime().sessions() as s:
        attempts = list(s.scalars(select(Result.attempts).where(Result.job_id == job.id)))
    assert attempts == [1] * st["chunks_total"]
    # and its cost is the batch price of its tokens: half the default tier's
    price = runtime().settings.price_for("docq-sim")
    assert price is not None
    default = price.cost(st["tokens_in"], st["tokens_out"])
    assert st["cost"] == pytest.approx(default / 2, rel=1e-9)
    print(f"\nfigures: {by_status['429']} flex refusals waited out for {st['chunks_total']} "
          f"chunks; cost ${st['cost']:.6f} vs ${default:.6f} at the default tier")
