"""The provider simulator over HTTP, through langchain-openai's real clients.

Raw HTTP (httpx, aiohttp) is used only where volume or exact bytes matter.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import aiohttp
import httpx
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel, Field

from docqueue.workers.testing.simulator.process import SimulatorProcess, SimulatorStartError
from docqueue.workers.testing.simulator.tokens import count_messages, count_text
from tests.plugins.simulator import SimulatorFactory

pytestmark = pytest.mark.integration

MODEL = "docq-sim"


def chat_model(sim: SimulatorProcess, **kwargs: Any) -> ChatOpenAI:
    options: dict[str, Any] = {"api_key": "x", "max_retries": 0, "model": MODEL, **kwargs}
    return ChatOpenAI(base_url=sim.url, **options)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def post(
    client: httpx.Client,
    sim: SimulatorProcess,
    body: Any,
    path: str = "/chat/completions",
    timeout: float = 10,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        sim.url + path,
        content=content,
        timeout=timeout,
        headers={"content-type": "application/json"},
    )


def chat_body(content: str = "hello", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


async def fire(
    sim: SimulatorProcess, bodies: list[dict[str, Any]], concurrency: int
) -> list[tuple[int, bytes]]:
    """POST every body with `concurrency` connections; (status, body) in request order."""
    out: list[tuple[int, bytes]] = [(0, b"")] * len(bodies)
    queue = list(enumerate(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                i, body = queue.pop(0)
                async with session.post(sim.url + "/chat/completions", json=body) as resp:
                    out[i] = (resp.status, await resp.read())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def test_chat_reply_has_openai_shape_and_true_token_counts(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given a simulator and a chat model pointed at it
    sim = simulator("--seed", "1")
    llm = chat_model(sim)
    # When the model is asked something
    message = llm.invoke("Summarize the annual report in one line.")
    # Then the usage is tiktoken's count of the prompt (with framing) and of the reply
    assert isinstance(message, AIMessage) and message.content
    assert message.usage_metadata is not None
    expected_prompt = count_messages(
        [{"role": "user", "content": "Summarize the annual report in one line."}]
    )
    assert message.usage_metadata["input_tokens"] == expected_prompt
    assert message.usage_metadata["output_tokens"] == count_text(str(message.content))
    # And the raw body has every field of OpenAI's shape
    body = post(http, sim, chat_body(max_tokens=3)).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_same_request_gets_the_same_reply(simulator: SimulatorFactory) -> None:
    # Given a simulator
    sim = simulator()
    llm = chat_model(sim, temperature=0.3)
    # When the same prompt is sent twice and another prompt once
    first, second = llm.invoke("alpha"), llm.invoke("alpha")
    other = llm.invoke("beta")
    # Then the repeats agree and the other differs
    assert first.content == second.content
    assert other.content != first.content


def test_completion_mode_works_and_reports_usage(simulator: SimulatorFactory) -> None:
    # Given the completions endpoint through langchain's OpenAI class
    sim = simulator()
    llm = OpenAI(base_url=sim.url, api_key="x", model=MODEL, max_retries=0, max_tokens=20)
    # When two prompts are completed
    result = llm.generate(["Once upon a time", "The quarterly numbers"])
    # Then each has text and the usage adds up over both
    texts = [g[0].text for g in result.generations]
    assert all(texts)
    assert result.llm_output is not None
    usage = result.llm_output["token_usage"]
    assert usage["prompt_tokens"] == count_text("Once upon a time") + count_text(
        "The quarterly numbers"
    )
    assert usage["completion_tokens"] == sum(count_text(t) for t in texts)
    assert all(count_text(t) <= 20 for t in texts)


class Line(BaseModel):
    label: str = Field(min_length=2, max_length=12)
    amount: int = Field(ge=0, le=1000)


class Invoice(BaseModel):
    vendor: str
    currency: Literal["EUR", "USD"]
    lines: list[Line] = Field(min_length=1, max_length=4)
    paid: bool
    note: str | None = None


def test_structured_output_with_json_schema_parses(simulator: SimulatorFactory) -> None:
    # Given a nested pydantic schema sent as response_format json_schema
    sim = simulator()
    structured = chat_model(sim).with_structured_output(Invoice, method="json_schema")
    # When several different documents are "extracted"
    results = [structured.invoke(f"Extract the invoice from document {i}.") for i in range(8)]
    # Then every reply parses into the schema (pydantic checked the bounds and enums)
    assert all(isinstance(r, Invoice) for r in results)
    assert len({r.model_dump_json() for r in results if isinstance(r, Invoice)}) > 1


def test_function_calling_structured_output_parses(simulator: SimulatorFactory) -> None:
    # Given the same schema through a forced tool call
    sim = simulator()
    structured = chat_model(sim).with_structured_output(Invoice, method="function_calling")
    # When asked, then the tool call's arguments parse into the schema
    assert isinstance(structured.invoke("Extract the invoice."), Invoice)


def test_rpm_burst_gets_exactly_the_budgeted_429s(simulator: SimulatorFactory) -> None:
    # Given 60 requests per minute (a full bucket, refilling one request per second)
    sim = simulator("--rpm", "60")
    llm = chat_model(sim, include_response_headers=True)
    # When 100 requests arrive at once
    started = time.monotonic()
    results = llm.batch(
        [f"q{i}" for i in range(100)], config={"max_concurrency": 100}, return_exceptions=True
    )
    elapsed_s = time.monotonic() - started
    ok = [r for r in results if isinstance(r, AIMessage)]
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    # Then 60 pass (plus one per whole second the burst took) and the rest get 429
    refilled = len(ok) - 60
    assert 0 <= refilled <= math.floor(elapsed_s)
    assert len(limited) == 100 - len(ok)
    # And the successes counted the remaining requests down from 59 to 0
    remaining = sorted(
        int(m.response_metadata["headers"]["x-ratelimit-remaining-requests"]) for m in ok
    )
    assert set(remaining) == set(range(60))
    # And each 429 is OpenAI's rate-limit error on the requests budget
    body = limited[0].body
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
    assert body["type"] == "requests" and body["param"] is None
    # When a fresh request is refused, retried at once, then retried after retry-after-ms
    with pytest.raises(openai.RateLimitError) as refused:
        llm.invoke("late")
    headers = refused.value.response.headers
    wait_ms = int(headers["retry-after-ms"])
    assert int(headers["retry-after"]) == math.ceil(wait_ms / 1000)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        llm.invoke("too soon")
    time.sleep(wait_ms / 1000)
    # Then the retry after the advertised wait is admitted
    assert isinstance(llm.invoke("on time"), AIMessage)
    stats = sim.stats()
    assert stats["rate_limited"]["requests"] == len(limited) + 2
    assert stats["by_status"]["200"] == len(ok) + 1


def test_tpm_charges_prompt_plus_max_tokens(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given 1,000 tokens per minute
    sim = simulator("--tpm", "1000")
    prompt_tokens = count_messages([{"role": "user", "content": "count me"}])
    # When a request with max_tokens=300 is admitted
    first = post(http, sim, chat_body("count me", max_tokens=300))
    # Then the budget dropped by its prompt plus 300, whatever the reply's length
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000 - prompt_tokens - 300
    assert "x-ratelimit-limit-requests" not in first.headers  # no --rpm: no request headers
    # When requests continue until one is refused
    statuses = [
        post(http, sim, chat_body("count me", max_tokens=300)).status_code for _ in range(3)
    ]
    # Then the fourth in all is refused on tokens (4 x (prompt + 300) > 1000)
    assert statuses == [200, 200, 429]
    refused = post(http, sim, chat_body("count me", max_tokens=300))
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    # And a request larger than the whole minute is refused with no retry-after
    huge = post(http, sim, chat_body("count me", max_tokens=5000))
    assert huge.status_code == 429 and "retry-after" not in huge.headers
    assert "Request too large" in huge.json()["error"]["message"]
    assert sim.stats()["tokens_admitted"] == 3 * (prompt_tokens + 300)


def test_fault_rate_lands_within_binomial_bounds(simulator: SimulatorFactory) -> None:
    # Given a 20% failure rate with a seed
    sim = simulator("--fail-rate", "0.2", "--seed", "7")
    # When 1,000 requests are sent
    results = asyncio.run(fire(sim, [chat_body(f"d{i}") for i in range(1000)], 50))
    # Then the failures are within 4.5 standard deviations of 200 and all 500/502/503
    statuses = Counter(status for status, _ in results)
    failed = sum(n for s, n in statuses.items() if s >= 500)
    assert 143 <= failed <= 257, statuses
    assert set(statuses) <= {200, 500, 502, 503} and len(set(statuses) - {200}) == 3
    error = json.loads(next(body for status, body in results if status == 502))["error"]
    assert error["type"] == "server_error" and error["code"] == "bad_gateway"
    assert sim.stats()["faults"]["fail"] == failed


def test_fault_draws_repeat_with_the_same_seed(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given two simulators with the same seed and one with another
    sims = [simulator("--fail-rate", "0.3", "--seed", s) for s in ("5", "5", "6")]
    # When each gets the same 60 requests in order
    runs = [[post(http, sim, chat_body(str(i))).status_code for i in range(60)] for sim in sims]
    # Then the seeded sequences match and the other seed's differs
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_garbage_reply_breaks_the_client(simulator: SimulatorFactory, http: httpx.Client) -> None:
    # Given every reply malformed
    sim = simulator("--garbage-rate", "1", "--seed", "2")
    # When raw bodies are fetched
    bodies = [post(http, sim, chat_body(str(i))) for i in range(20)]
    # Then each is a 200 that is not JSON or has no choices, both kinds occurring
    kinds = set()
    for response in bodies:
        assert response.status_code == 200
        try:
            kinds.add("no choices" if "choices" not in response.json() else "ok")
        except json.JSONDecodeError:
            kinds.add("not json")
    assert kinds == {"no choices", "not json"}
    # And langchain cannot use such a reply
    with pytest.raises(Exception):  # noqa: B017, PT011 - the client's exception type varies by kind
        chat_model(sim).invoke("x")


def test_timeout_fault_outlasts_the_client_timeout(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given every request held for 10 minutes
    sim = simulator("--timeout-rate", "1")
    llm = chat_model(sim, timeout=0.5)
    # When the client waits half a second
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        llm.invoke("hello?")
    # Then the client's timeout fired, not a server answer
    assert 0.4 <= time.monotonic() - started < 5
    # And the held request does not hold up shutdown
    held = simulator("--timeout-rate", "1")
    with pytest.raises(httpx.ReadTimeout):
        post(http, held, chat_body(), timeout=0.3)
    started = time.monotonic()
    held.stop()
    assert time.monotonic() - started < 3


def test_latency_holds_many_requests_at_once(simulator: SimulatorFactory) -> None:
    # Given a 400 ms latency
    sim = simulator("--latency-ms", "400", "--output-tokens-mean", "5")
    # When 500 requests are sent together
    started = time.monotonic()
    results = asyncio.run(fire(sim, [chat_body(str(i)) for i in range(500)], 500))
    elapsed_s = time.monotonic() - started
    # Then all succeed, none sooner than the latency, in far less than 500 x 400 ms
    assert all(status == 200 for status, _ in results)
    assert 0.4 <= elapsed_s < 5
    assert sim.stats()["peak_in_flight"] >= 400


def test_api_key_is_required_and_never_echoed(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given a simulator that wants a key
    sim = simulator("--api-key", "right-key")
    # When a client sends a wrong key
    with pytest.raises(openai.AuthenticationError) as wrong:
        ChatOpenAI(base_url=sim.url, api_key="wrong-key-123", model=MODEL, max_retries=0).invoke(
            "hi"
        )
    # Then it is a 401 invalid_api_key that does not repeat the key
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert "wrong-key-123" not in wrong.value.response.text
    # And no key at all is a 401 too, while the right key works
    missing = post(http, sim, chat_body())
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert (
        ChatOpenAI(base_url=sim.url, api_key="right-key", model=MODEL, max_retries=0)
        .invoke("hi")
        .content
    )
    assert "right-key" not in sim.output() and "right-key" not in repr(sim)


def test_unknown_model_is_404_model_not_found(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given a simulator serving two named models
    sim = simulator("--model", "small", "--model", "large")
    # When a client asks for a third
    with pytest.raises(openai.NotFoundError) as caught:
        ChatOpenAI(base_url=sim.url, api_key="x", model="gpt-9", max_retries=0).invoke("hi")
    # Then it is OpenAI's model_not_found, and the served ones work and are listed
    assert caught.value.code == "model_not_found" and "gpt-9" in caught.value.message
    assert ChatOpenAI(base_url=sim.url, api_key="x", model="large", max_retries=0).invoke("hi")
    listed = http.get(sim.url + "/models").json()
    assert [m["id"] for m in listed["data"]] == ["small", "large"]


def test_context_limit_is_400_with_the_token_counts(simulator: SimulatorFactory) -> None:
    # Given a 50-token context
    sim = simulator("--context-limit", "50")
    long_text = "word " * 100
    prompt_tokens = count_messages([{"role": "user", "content": long_text}])
    # When a longer prompt is sent
    with pytest.raises(openai.BadRequestError) as caught:
        chat_model(sim).invoke(long_text)
    # Then the error says both numbers
    assert caught.value.code == "context_length_exceeded"
    assert "50 tokens" in caught.value.message and f"{prompt_tokens} tokens" in caught.value.message


def test_bad_requests_get_openai_error_shapes(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given a simulator with a small body limit and an RPM limit
    sim = simulator("--max-body-bytes", "2000", "--rpm", "100")
    cases: list[tuple[httpx.Response, int, str | None]] = [
        (post(http, sim, b"{not json"), 400, "invalid_json"),
        (post(http, sim, {"model": MODEL}), 400, "missing_required_parameter"),
        (
            post(http, sim, {"messages": [{"role": "user", "content": "x"}]}),
            400,
            "missing_required_parameter",
        ),
        (post(http, sim, {"model": MODEL, "messages": {"role": "user"}}), 400, "invalid_type"),
        (post(http, sim, {"model": MODEL, "prompt": 7}, "/completions"), 400, "invalid_type"),
        (post(http, sim, chat_body(stream=True)), 400, "unsupported_parameter"),
        (post(http, sim, chat_body("x" * 5000)), 413, "request_too_large"),
        (http.get(sim.url + "/nowhere"), 404, "not_found"),
        (http.get(sim.url + "/chat/completions"), 405, "method_not_allowed"),
    ]
    for response, status, code in cases:
        # Then each has its status, OpenAI's JSON shape and the rate-limit headers
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code and error["message"]
        assert response.headers["x-ratelimit-limit-requests"] == "100"
    # And none of them cost a request from the budget
    assert post(http, sim, chat_body()).headers["x-ratelimit-remaining-requests"] == "99"
    # And the client sees the 413 as an error, not a broken connection
    with pytest.raises(openai.APIStatusError) as caught:
        chat_model(sim).invoke("y" * 5000)
    assert caught.value.status_code == 413


def test_stats_count_what_was_served_and_reset(
    simulator: SimulatorFactory, http: httpx.Client
) -> None:
    # Given a few successes and one bad request
    sim = simulator()
    replies = [post(http, sim, chat_body(str(i))).json() for i in range(3)]
    post(http, sim, {"model": MODEL})
    # When the stats are read
    stats = sim.stats()
    # Then they match the usage the replies reported, per status and per second
    prompt = sum(r["usage"]["prompt_tokens"] for r in replies)
    completion = sum(r["usage"]["completion_tokens"] for r in replies)
    assert stats["requests_total"] == 4 and stats["by_status"] == {"200": 3, "400": 1}
    assert stats["tokens_served"] == {
        "prompt": prompt,
        "cached_prompt": 0,  # prompts under 1,024 tokens are never cached
        "completion": completion,
        "total": prompt + completion,
    }
    assert sum(s["tokens"] for s in stats["per_second"]) == prompt + completion
    assert sum(s["requests"] for s in stats["per_second"]) == 4
    # When they are reset, then they are zero
    sim.reset_stats()
    assert sim.stats()["requests_total"] == 0 and sim.stats()["per_second"] == []


def test_bad_option_fails_start_with_the_servers_message() -> None:
    # When the simulator is started with an impossible option
    with pytest.raises(SimulatorStartError, match="--garbage-rate: must be between 0 and 1"):
        SimulatorProcess("--garbage-rate", "3").start()
