"""Every token priced as billed: a job whose long instructions come first is mostly cached
prompt tokens, and its ledger and its estimate price them at the cached rate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from docqueue.models import Result
from docqueue.tasks import submit
from docqueue.tasks.cli import cli
from docqueue.tasks.control import estimate
from docqueue.tasks.runtime import runtime
from docqueue.workers.pipelines import Prompt
from docqueue.workers.provider.client import EndpointConfig, OpenAICompatibleLLM
from docqueue.workers.provider.lean import LeanLLM
from docqueue.workers.tokens import count_tokens

pytestmark = pytest.mark.integration

# gpt-4.1's published prices per million tokens, written out here rather than read from the
# table: the test checks the ledger against what the provider bills.
INPUT, CACHED_INPUT, OUTPUT = 2.00, 0.50, 8.00

TOPICS = ("ferries", "harbours", "tides", "fishing quotas", "lighthouses", "weather warnings",
          "ticket prices", "timetables", "cargo", "passenger safety")


def instructions() -> str:
    """About 1,500 tokens of instructions, the same for every chunk."""
    rules = [f"Rule {i + 1}: if the text mentions {TOPICS[i % len(TOPICS)]}, name the place and "
             f"the date it gives, quote the sentence, and say whether it is a plan or a fact."
             for i in range(42)]
    return ("You read reports about a coastal ferry service. Apply every rule below to the "
            "text at the end.\n\n" + "\n".join(rules) + "\n\n<text>\n{text}\n</text>")


def corpus(n: int) -> list[tuple[str, str]]:
    # Every chunk different: identical chunks would be answered from the response cache.
    return [(f"report-{i}", " ".join(
        f"Report {i}, part {p}: the {TOPICS[(i + p) % len(TOPICS)]} of pier {i * 7 + p} were "
        f"reviewed on day {p + 1} and found in order by inspector number {i * 31 + p}."
        for p in range(12))) for i in range(n)]


def test_a_job_with_a_long_instruction_prefix_is_billed_its_cached_tokens_at_the_cached_rate(
    simulator: Any, docq_env: Any, workers: Any
) -> None:
    # Given a provider serving gpt-4.1 with a prompt cache, and a custom pipeline whose
    # 1,500-token instructions come before the chunk
    prompt = instructions()
    assert 1450 <= count_tokens(prompt) <= 1550
    sim = simulator("--model", "gpt-4.1", "--seed", "5")
    env = docq_env(sim.url, llm_model="gpt-4.1", chunk_tokens=120, chunk_overlap_tokens=0,
                   batch_max_chunks=8, batch_min_chunks=4)
    workers(env)
    docs = corpus(8)
    # and the estimate made before the job
    est = estimate(docs, "custom", prompt=prompt)
    # When the job runs (cache off: every chunk is a call)
    job = submit(docs, "custom", prompt=prompt, cache="off")
    # About 30 calls at zero latency take a second or two; 120 s leaves room for a loaded
    # machine's worker start and Celery round trips.
    st = job.wait(timeout=120)
    assert st["status"] == "succeeded", st
    with runtime().sessions() as s:
        rows = list(s.scalars(select(Result).where(Result.job_id == job.id)))
    served = sim.stats()["tokens_served"]
    # Then the job recorded the usage the provider reported, cached tokens included
    assert len(rows) == st["chunks_total"] == est["chunks"] > 20
    assert (st["tokens_in"], st["tokens_in_cached"], st["tokens_out"]) == (
        served["prompt"], served["cached_prompt"], served["completion"])
    assert st["tokens_in_cached"] == sum(r.tokens_in_cached for r in rows)
    # every call but the first found the instructions in the cache, in 128-token steps
    cached = sorted(r.tokens_in_cached for r in rows)
    assert cached[0] == 0 and all(c >= 1024 and c % 128 == 0 for c in cached[1:])
    # and its cost is what the provider bills for that usage, within 1%
    billed = ((served["prompt"] - served["cached_prompt"]) * INPUT
              + served["cached_prompt"] * CACHED_INPUT + served["completion"] * OUTPUT) / 1e6
    assert st["cost"] == pytest.approx(billed, rel=0.01)
    # each row too: its cost is its own usage at those rates
    for r in rows:
        assert r.cost == pytest.approx(((r.tokens_in - r.tokens_in_cached) * INPUT
                                        + r.tokens_in_cached * CACHED_INPUT
                                        + r.tokens_out * OUTPUT) / 1e6, rel=0.01)
    # And the estimate said the same of the prompts within 10%: their tokens, the cached
    # share, and what they cost
    prompt_cost = billed - served["completion"] * OUTPUT / 1e6
    assert est["tokens_in"] == pytest.approx(st["tokens_in"], rel=0.10)
    assert est["tokens_in_cached"] == pytest.approx(st["tokens_in_cached"], rel=0.10)
    assert est["cost_min"] == pytest.approx(prompt_cost, rel=0.10)
    assert est["cost_min"] < st["cost"] < est["cost_max"]
    # And status shows the cache's share of the prompt tokens and what it saved
    share = st["tokens_in_cached"] / st["tokens_in"]
    assert st["prompt_cache_share"] == pytest.approx(share, abs=1e-4) and share > 0.75
    saved = st["tokens_in_cached"] * (INPUT - CACHED_INPUT) / 1e6
    assert st["prompt_cache_saved"] == pytest.approx(saved, rel=1e-9)
    shown = CliRunner().invoke(cli, ["status", str(job.id)])
    assert shown.exit_code == 0, shown.output
    assert f"({st['tokens_in_cached']:,} cached, {share:.1%})" in shown.output
    assert f"prompt cache saved ${saved:.4f}" in shown.output
    est_cached = est["tokens_in_cached"] / st["tokens_in_cached"] - 1
    print(f"\nfigures: {len(rows)} calls; prompt tokens {st['tokens_in']:,}, cached "
          f"{st['tokens_in_cached']:,} ({share:.1%}); cost ${st['cost']:.6f}, billed "
          f"${billed:.6f} ({st['cost'] / billed - 1:+.4%}); saved ${saved:.6f}; estimate "
          f"cached {est['tokens_in_cached']:,} ({est_cached:+.2%}), prompt cost "
          f"${est['cost_min']:.6f} vs ${prompt_cost:.6f} "
          f"({est['cost_min'] / prompt_cost - 1:+.2%}); at the full input rate the job would "
          f"have cost ${st['cost'] + saved:.6f}")


def test_both_clients_send_the_key_and_read_the_cached_tokens(simulator: Any) -> None:
    # Given a provider with a prompt cache and a prompt of about 1,500 shared tokens
    sim = simulator("--seed", "2")
    shared = instructions()

    def chat(chunk: str) -> Prompt:
        return Prompt(messages=[{"role": "system", "content": "Reply in one line."},
                                {"role": "user", "content": shared.replace("{text}", chunk)}])

    async def calls(llm: Any, prefix: str) -> list[tuple[int, int]]:
        got = []
        try:
            for key, chunk in (("a", "one"), ("a", "two"), ("b", "three"), ("b", "four")):
                c = await llm.complete(chat(chunk), max_tokens=20, cache_key=f"{prefix}-{key}")
                got.append((c.tokens_in, c.tokens_in_cached))
        finally:
            await llm.aclose()
        return got

    for name, make in (("langchain", OpenAICompatibleLLM), ("lean", LeanLLM)):
        cfg = EndpointConfig(base_url=sim.url, model="docq-sim", mode="chat", api_key=None,
                             timeout_s=10, temperature=0.0, max_connections=2)
        # When each client makes two calls under one key, then two under another
        got = asyncio.run(calls(make(cfg), name))
        # Then the second call of each key finds the shared prefix, the first of a key does
        # not: the key reached the provider, and its cached count came back
        assert [c for _, c in got][0::2] == [0, 0], (name, got)
        assert all(c >= 1024 and c % 128 == 0 and c <= tin for tin, c in got[1::2]), (name, got)
