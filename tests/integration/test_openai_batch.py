"""An OpenAI Batch file end to end: `docq submit --pipeline openai-batch`, real workers, the
simulator, and `docq results --format openai-batch` writing OpenAI's output and error files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from docqueue.tasks.api import JobHandle
from docqueue.tasks.cli import cli

pytestmark = pytest.mark.integration

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
CONTEXT_LIMIT = 200
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def request(custom_id: str, url: str, body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
            "max_tokens": 30, **fields}


# Ten bad lines of ten kinds, at the line numbers (1-based) where they sit.
BAD = {
    7: "this is not JSON",
    19: "[1, 2, 3]",
    33: json.dumps({"method": "POST", "url": CHAT, "body": chat("no id")}),
    48: request("req-001", CHAT, chat("a repeated custom_id")),
    61: json.dumps({"custom_id": "get", "method": "GET", "url": CHAT, "body": chat("x")}),
    77: request("embed", "/v1/embeddings", {"model": "m", "input": "x"}),
    90: request("body-list", CHAT, []),
    104: request("no-messages", CHAT, {"model": "gpt-4o-mini"}),
    122: request("prompts", COMPLETIONS, {"model": "m", "prompt": ["a", "b"]}),
    140: request("stream", CHAT, chat("x", stream=True)),
}
TOO_LONG = {25, 70, 111, 150, 188}  # prompts over the simulator's context limit
WITH_SCHEMA = {12, 130}


def batch_file(path: Path) -> list[str | None]:
    """Write a 200-line batch file; return each line's custom_id as the files should show it."""
    lines, expected = [], []
    for n in range(1, 201):
        custom_id = f"req-{n:03d}"
        if n in BAD:
            lines.append(BAD[n])
            known = json.loads(BAD[n]) if BAD[n].startswith("{") else {}
            cid = known.get("custom_id")
            expected.append(None if cid == "req-001" else cid)  # a repeat gives up its id
            continue
        if n in TOO_LONG:  # chat on odd lines, completions on even ones
            long_text = " ".join(f"harbour{i}" for i in range(CONTEXT_LIMIT + 50))
            lines.append(request(custom_id, CHAT, chat(long_text)) if n % 2 else request(
                custom_id, COMPLETIONS, {"model": "m", "prompt": long_text, "max_tokens": 30}))
        elif n in WITH_SCHEMA:
            schema = {"type": "json_schema",
                      "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
            lines.append(request(custom_id, CHAT, chat(f"A city, #{n}.", max_tokens=120,
                                                       response_format=schema)))
        elif n % 3 == 0:
            lines.append(request(custom_id, COMPLETIONS, {
                "model": "gpt-3.5-turbo-instruct", "prompt": f"Line {n}: once upon a time",
                "max_tokens": 20, "temperature": 0.5, "stop": ["\n\n"]}))
        else:
            lines.append(request(custom_id, CHAT, chat(f"Request {n}: say something.",
                                                       temperature=0.2, seed=n)))
        expected.append(custom_id)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return expected


def test_a_batch_file_round_trips_to_output_and_error_files(
    simulator: Any, docq_env: Any, workers: Any, tmp_path: Path
) -> None:
    # Given a simulator with a 200-token context, two worker processes sharing the global
    # limiter, and a 200-line batch file with 10 bad lines, 5 prompts over the context limit
    # and 2 json_schema requests
    sim = simulator("--seed", "5", "--context-limit", str(CONTEXT_LIMIT), "--rpm", "6000")
    env = docq_env(sim.url, llm_rpm=6000)
    workers(env)
    path = tmp_path / "requests.jsonl"
    expected = batch_file(path)
    runner = CliRunner()

    # When it is submitted with `docq submit FILE --pipeline openai-batch`
    submitted = runner.invoke(cli, ["submit", str(path), "--pipeline", "openai-batch", "--json"])
    assert submitted.exit_code == 0, submitted.output
    report = json.loads(submitted.output)
    assert (report["documents_accepted"], report["documents_rejected"]) == (190, 10)
    assert report["chunks"] == 190  # one chunk per request
    final = JobHandle(report["job_id"]).wait(timeout=120)
    assert final["status"] == "partial", final

    # And its results are written with `docq results JOB --format openai-batch --output PREFIX`
    prefix = tmp_path / "out" / "batch"
    prefix.parent.mkdir()
    written = runner.invoke(cli, ["results", str(report["job_id"]), "--format", "openai-batch",
                                  "--output", str(prefix)])
    assert written.exit_code == 0, written.output
    output = [json.loads(x) for x in Path(f"{prefix}.output.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in Path(f"{prefix}.errors.jsonl").read_text().splitlines()]
    assert f"185 responses in {prefix}.output.jsonl" in written.output
    assert f"15 errors in {prefix}.errors.jsonl" in written.output

    # Then every line is accounted for once, in input order, and every custom_id exactly once
    assert len(output) + len(errors) == 200
    order = {cid: i for i, cid in enumerate(expected) if cid is not None}
    assert [r["custom_id"] for r in output] == sorted(
        (r["custom_id"] for r in output), key=order.__getitem__)
    ids = Counter(r["custom_id"] for r in output + errors if r["custom_id"] is not None)
    assert ids == Counter(cid for cid in expected if cid is not None)
    assert sum(1 for r in errors if r["custom_id"] is None) == 4
    # And only the 190 good requests reached the model, each once
    assert sim.stats()["requests_total"] == 190

    # And every success has content, usage and the object of its endpoint
    assert len(output) == 185 and all(r["error"] is None for r in output)
    for r in output:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
        assert body["usage"]["total_tokens"] == (
            body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"])
        choice = body["choices"][0]
        if body["object"] == "chat.completion":
            assert choice["message"]["content"]
        else:
            assert body["object"] == "text_completion" and choice["text"]
    objects = Counter(r["response"]["body"]["object"] for r in output)
    assert objects["chat.completion"] > 50 and objects["text_completion"] > 50

    # And a json_schema response_format was honoured: the content is schema-valid JSON
    by_id = {r["custom_id"]: r for r in output}
    for n in WITH_SCHEMA:
        content = by_id[f"req-{n:03d}"]["response"]["body"]["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMA)

    # And the prompts over the context limit carry the provider's 400 and its code
    failed = {r["custom_id"]: r for r in errors if r["custom_id"] in order}
    for n in TOO_LONG:
        response = failed[f"req-{n:03d}"]["response"]
        assert response is not None, failed[f"req-{n:03d}"]
        assert response["status_code"] == 400
        assert response["body"]["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 200 tokens" in response["body"]["error"]["message"]
    # And each bad line is an error naming its line
    messages = [json.dumps(r) for r in errors]
    for n in BAD:
        assert sum(f"requests.jsonl line {n} " in m for m in messages) == 1, n
