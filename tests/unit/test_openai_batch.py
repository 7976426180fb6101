"""OpenAI Batch files: reading requests, rendering them as prompts, writing OpenAI's two files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Chunk, Document, Job, JobStatus, Result, make_sessionmaker
from docqueue.workers.errors import InputError, PipelineError
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.jobs.merging import merge_job
from docqueue.workers.jobs.submission import create_job, ingest
from docqueue.workers.pipelines import build_pipeline
from docqueue.workers.pipelines.openai_batch_reading import (
    MAX_FILE_BYTES,
    MAX_REQUESTS,
    OpenAIBatchFileError,
    read_openai_batch_file,
)
from docqueue.workers.pipelines.openai_batch_results import (
    JobNotFinishedError,
    write_openai_batch_results,
)
from docqueue.workers.settings import Settings

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Say hello."}]


def line(custom_id: Any, url: str = CHAT, body: Any = None, method: str = "POST") -> str:
    if body is None:
        body = {"model": "gpt-4o-mini", "messages": USER}
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def read(tmp_path: Path, *lines: str, max_bytes: int = 100_000) -> list[SourceDocument]:
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list(read_openai_batch_file(path, max_bytes=max_bytes))


# -- reading ---------------------------------------------------------------------------------


def test_a_good_line_becomes_a_document_named_by_its_custom_id(tmp_path: Path) -> None:
    # Given a file with one chat request
    # When it is read
    [doc] = read(tmp_path, line("req-1"))
    # Then the document is the request as canonical JSON, named and located
    assert doc.ok and doc.external_id == "req-1"
    assert doc.text is not None
    assert json.loads(doc.text) == {
        "url": CHAT, "body": {"model": "gpt-4o-mini", "messages": USER}
    }
    assert doc.metadata == {
        "url": CHAT, "line": 1, "custom_id": "req-1", "requested_model": "gpt-4o-mini"
    }
    assert doc.source and doc.source.endswith("batch.jsonl:1")


BAD_LINES = [
    # (the line, its error code, words the message holds, custom_id kept, HTTP status)
    ("not json at all", "invalid_json", "is not valid JSON", None, None),
    ('["a", "list"]', "invalid_request", "is an array, not an object", None, None),
    ('{"method": "POST", "url": "/v1/chat/completions", "body": {}}', "missing_custom_id",
     "has no custom_id", None, None),
    (line(7), "invalid_custom_id", "custom_id that is a number", None, None),
    (line(""), "invalid_custom_id", "custom_id that is an empty string", None, None),
    (line("first"), "duplicate_custom_id", "repeats the custom_id 'first' of line 1", None, None),
    (line("m", method="GET"), "invalid_method", 'has method "GET"', "m", None),
    (line("u", url="/v1/embeddings"), "invalid_url", 'has url "/v1/embeddings"', "u", None),
    (line("b", body=[1]), "invalid_body", "has a body that is an array", "b", None),
    (line("c", body={"model": "x"}), "missing_required_parameter",
     "chat body without 'messages'", "c", 400),
    (line("c2", body={"messages": "hi"}), "invalid_type", "'messages' that is a string", "c2",
     400),
    (line("p", COMPLETIONS, {"model": "x"}), "missing_required_parameter",
     "completion body without a 'prompt'", "p", 400),
    (line("p2", COMPLETIONS, {"prompt": ["a", "b"]}), "unsupported_value",
     "list of several prompts", "p2", 400),
    (line("s", body={"messages": USER, "stream": True}), "unsupported_value",
     "asks for streaming", "s", 400),
    (line("n", body={"messages": USER, "n": 3}), "unsupported_value", "asks for n=3", "n", 400),
    (line("t", body={"messages": USER, "tools": []}), "unsupported_parameter",
     "body field 'tools'", "t", 400),
    (line("r", body={"messages": [{"role": "tool", "content": "x"}]}), "invalid_value",
     'messages[0] with role "tool"', "r", 400),
    (line("i", body={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
     "unsupported_value", "part of type 'image_url'", "i", 400),
    (line("x", body={"messages": USER, "max_tokens": 0}), "invalid_value", "max_tokens=0", "x",
     400),
]


@pytest.mark.parametrize(("bad", "code", "words", "custom_id", "status"), BAD_LINES)
def test_a_bad_line_becomes_an_error_naming_the_line_and_the_stream_goes_on(
    tmp_path: Path, bad: str, code: str, words: str, custom_id: str | None, status: int | None
) -> None:
    # Given a good line, the bad one, and another good line
    # When the file is read
    docs = read(tmp_path, line("first"), bad, line("last"))
    # Then the bad line is an error that names the file, the line and the problem
    assert [d.ok for d in docs] == [True, False, True]
    error = docs[1].error
    assert error is not None and "batch.jsonl line 2" in error and words in error, error
    if custom_id is not None:
        assert f"(custom_id {custom_id!r})" in error
    # And its metadata keeps what the error file needs
    meta = docs[1].metadata
    assert (meta["line"], meta["custom_id"], meta["error_code"], meta["http_status"]) == (
        2, custom_id, code, status)
    assert docs[2].external_id == "last"


def test_a_line_over_the_size_limit_is_an_error_and_is_not_held(tmp_path: Path) -> None:
    # Given a request line longer than the per-document limit
    long_body = {"messages": [{"role": "user", "content": "x" * 5_000}]}
    # When the file is read with a 1,000-byte limit
    docs = read(tmp_path, line("big", body=long_body), line("small"), max_bytes=1_000)
    # Then the long line is an error that gives its size, and the next line is fine
    assert docs[0].error is not None and "over the limit of 1,000 bytes" in docs[0].error
    assert docs[1].ok


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path: Path) -> None:
    # Given blank lines around the requests
    # When the file is read / Then each document knows its own line
    docs = read(tmp_path, "", line("a"), "   ", "bad")
    assert [d.metadata["line"] for d in docs] == [2, 4]


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "holds no requests"), (b"\n  \n", "holds no requests")],
)
def test_an_empty_file_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    # Given a file with no requests
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    # When it is read / Then it is refused whole, naming the file
    with pytest.raises(OpenAIBatchFileError, match=f"empty.jsonl {problem}"):
        read_openai_batch_file(path, max_bytes=1000)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OpenAIBatchFileError, match=r"nope\.jsonl does not exist"):
        read_openai_batch_file(tmp_path / "nope.jsonl", max_bytes=1000)


def test_a_file_over_openais_request_limit_is_refused_before_any_line_is_read(
    tmp_path: Path,
) -> None:
    # Given a file of 50,001 requests (OpenAI allows 50,000)
    path = tmp_path / "many.jsonl"
    path.write_text("".join(line(f"r{i}") + "\n" for i in range(MAX_REQUESTS + 1)))
    # When it is read / Then the call itself refuses it, so no job is ever created
    with pytest.raises(OpenAIBatchFileError,
                       match="holds 50,001 requests, over OpenAI's batch limit"):
        read_openai_batch_file(path, max_bytes=1000)


def test_a_file_over_openais_size_limit_is_refused(tmp_path: Path) -> None:
    # Given a (sparse) file one byte over 200 MB
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    # When it is read / Then it is refused with its size and the limit
    with pytest.raises(OpenAIBatchFileError,
                       match="209,715,201 bytes, over OpenAI's batch file limit"):
        read_openai_batch_file(path, max_bytes=1000)


# -- rendering -------------------------------------------------------------------------------


def render(tmp_path: Path, url: str, body: dict[str, Any]) -> Any:
    [doc] = read(tmp_path, line("r", url, body))
    assert doc.ok and doc.text is not None, doc.error
    return build_pipeline("openai-batch", {}).render(doc.text, "completion")


def test_a_chat_body_renders_as_messages_with_its_generation_fields(tmp_path: Path) -> None:
    # Given a chat request with text parts, a developer message and generation fields
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    body = {
        "model": "gpt-4o", "stream": False, "n": 1,
        "messages": [
            {"role": "developer", "content": "Answer in JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Name"},
                                         {"type": "text", "text": "a colour."}]},
            {"role": "assistant", "content": "Red."},
        ],
        "max_completion_tokens": 40, "temperature": 0.3, "seed": 7, "top_p": 0.9,
        "response_format": schema, "stop": "END", "user": "u-1",
    }
    # When it is rendered (the job's mode does not matter: the url picks the endpoint)
    prompt = render(tmp_path, CHAT, body)
    # Then the prompt is chat, with the fields sent as given and the model left to the job
    assert prompt.text is None
    assert prompt.messages == [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Name\na colour."},
        {"role": "assistant", "content": "Red."},
    ]
    assert prompt.max_tokens == 40 and prompt.stop == ["END"]
    assert prompt.response_format == schema
    assert prompt.params == {"temperature": 0.3, "seed": 7, "top_p": 0.9, "user": "u-1"}


def test_a_completion_body_renders_as_a_text_prompt(tmp_path: Path) -> None:
    # Given a completion request whose prompt is a list of one string
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["Once upon a time"],
            "max_tokens": 12, "stop": ["\n", "."], "frequency_penalty": 0.5}
    # When it is rendered
    prompt = render(tmp_path, COMPLETIONS, body)
    # Then it is a completion prompt with its own cap, stops and fields
    assert prompt.messages is None and prompt.text == "Once upon a time"
    assert prompt.max_tokens == 12 and prompt.stop == ["\n", "."]
    assert prompt.params == {"frequency_penalty": 0.5} and prompt.response_format is None


def test_the_pipeline_stores_the_reply_as_it_is_and_takes_documents_whole() -> None:
    # Given the openai-batch pipeline
    pipe = build_pipeline("openai-batch", {})
    # Then it does not chunk, its version is fixed, and a reply is kept unvalidated
    assert pipe.chunked is False and pipe.version == "openai-batch-r1"
    assert pipe.parse("not JSON {", "length") == {
        "content": "not JSON {", "finish_reason": "length"}
    assert pipe.merge([{"content": "x", "finish_reason": "stop"}]) == {
        "content": "x", "finish_reason": "stop"}
    with pytest.raises(PipelineError, match="takes no options"):
        build_pipeline("openai-batch", {"labels": ["a", "b"]})


# -- ingesting and writing -------------------------------------------------------------------


@pytest.fixture
def store(sqlite_url: str) -> Iterator[tuple[sessionmaker[Session], Settings]]:
    sessions = make_sessionmaker(sqlite_url)
    yield sessions, Settings(database_url=sqlite_url, llm_base_url="http://127.0.0.1:9/v1",
                             llm_model="docq-sim", chunk_tokens=50, chunk_overlap_tokens=0,
                             batch_max_chunks=3)
    sessions.kw["bind"].dispose()


def submit_file(
    store: tuple[sessionmaker[Session], Settings], path: Path
) -> tuple[int, dict[str, int]]:
    """Ingest a batch file as a job; return the job id and the chunk id of each custom_id."""
    sessions, settings = store
    with sessions.begin() as session:
        job_id = create_job(session, settings, build_pipeline("openai-batch", {})).id
    ingest(sessions, settings, job_id, read_openai_batch_file(path, max_bytes=100_000))
    with sessions() as session:
        rows = session.execute(
            select(Document.external_id, Chunk.id).join(Chunk, Chunk.document_id == Document.id)
            .where(Document.job_id == job_id)
        )
        return job_id, {r[0]: r[1] for r in rows}


def test_each_request_is_stored_as_one_whole_chunk(
    store: tuple[sessionmaker[Session], Settings], tmp_path: Path
) -> None:
    # Given a request far longer than the job's chunk size (50 tokens)
    long_text = "The harbour woke early and the boats went out. " * 40
    path = tmp_path / "b.jsonl"
    path.write_text(line("long", body={"messages": [{"role": "user", "content": long_text}]})
                    + "\n" + line("short") + "\n")
    # When it is ingested
    job_id, chunks = submit_file(store, path)
    # Then each request is exactly one chunk holding the whole request
    sessions, _ = store
    with sessions() as session:
        stored = session.scalars(select(Chunk).where(Chunk.job_id == job_id)
                                 .order_by(Chunk.id)).all()
    assert set(chunks) == {"long", "short"} and len(stored) == 2
    assert long_text.strip() in json.loads(stored[0].text)["body"]["messages"][0]["content"]
    assert stored[0].token_count > 400 and stored[0].char_end == len(stored[0].text)


def result(chunk_id: int, document_id: int, job_id: int, **fields: Any) -> Result:
    values: dict[str, Any] = {"pipeline_version": "openai-batch-r1", "tokens_in": 0,
                              "tokens_out": 0, "attempts": 1, **fields}
    return Result(chunk_id=chunk_id, document_id=document_id, job_id=job_id, **values)


def finished_job(store: tuple[sessionmaker[Session], Settings], tmp_path: Path) -> int:
    """A job whose requests ended every way a request can end."""
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join([
        line("chat-ok"),
        line("text-ok", COMPLETIONS, {"model": "x", "prompt": "Once"}),
        "{broken",
        line("no-prompt", COMPLETIONS, {"model": "x"}),
        line("too-long"),
        line("gave-up"),
        line("timed-out"),
        line("never-ran"),
        line("chat-ok"),  # a repeat: an error line of its own
    ]) + "\n")
    job_id, chunks = submit_file(store, path)
    sessions, _ = store
    with sessions.begin() as s:
        doc = {r[0]: r[1] for r in s.execute(select(Chunk.id, Chunk.document_id))}
        s.add_all([
            result(chunks["chat-ok"], doc[chunks["chat-ok"]], job_id, status="ok",
                   output={"content": '{"colour": "red"}', "finish_reason": "stop"},
                   finish_reason="stop", tokens_in=12, tokens_out=5),
            result(chunks["text-ok"], doc[chunks["text-ok"]], job_id, status="ok",
                   output={"content": " there was", "finish_reason": "length"},
                   finish_reason="length", tokens_in=2, tokens_out=3),
            result(chunks["too-long"], doc[chunks["too-long"]], job_id, status="error",
                   error_type="PermanentLLMError", http_status=400,
                   error_message="HTTP 400 context_length_exceeded: This model's maximum "
                   "context length is 100 tokens."),
            result(chunks["gave-up"], doc[chunks["gave-up"]], job_id, status="error",
                   error_type="RateLimitedError", http_status=429, attempts=5,
                   error_message="gave up after 5 attempts; last error: HTTP 429 "
                   "rate_limit_exceeded: Rate limit reached."),
            result(chunks["timed-out"], doc[chunks["timed-out"]], job_id, status="error",
                   error_type="RetryableLLMError", attempts=5,
                   error_message="gave up after 5 attempts; last error: the model did not "
                   "answer within 60 s"),
        ])
    with sessions.begin() as s:
        merge_job(s, job_id)  # as the chord callback does: it writes each document's error
        # "never-ran" has no result, so the merge leaves the job running; end it regardless
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.PARTIAL))
    return job_id


def write(store: tuple[sessionmaker[Session], Settings], tmp_path: Path,
          job_id: int) -> tuple[tuple[int, int], list[dict[str, Any]], list[dict[str, Any]]]:
    sessions, _ = store
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    with sessions() as session:
        counts = write_openai_batch_results(session, job_id, out, err)
    return (counts, [json.loads(x) for x in out.read_text().splitlines()],
            [json.loads(x) for x in err.read_text().splitlines()])


def test_results_are_written_in_openais_format_with_every_line_accounted_for(
    store: tuple[sessionmaker[Session], Settings], tmp_path: Path
) -> None:
    # Given a finished job with successes, read-time rejects, model errors and an unfinished one
    job_id = finished_job(store, tmp_path)
    # When its result files are written
    counts, output, errors = write(store, tmp_path, job_id)
    # Then the two files hold the nine lines, each custom_id once, in input order
    assert counts == (2, 7) == (len(output), len(errors))
    assert [r["custom_id"] for r in output] == ["chat-ok", "text-ok"]
    assert [r["custom_id"] for r in errors] == [
        None, "no-prompt", "too-long", "gave-up", "timed-out", "never-ran", None]
    ids = [r["id"] for r in output + errors]
    assert len(set(ids)) == 9 and all(i.startswith("batch_req_") for i in ids)
    # And a success is a chat.completion or text_completion body with usage
    chat, text = output[0], output[1]
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    # (the model is the job's, which answered, not the gpt-4o-mini the request named)
    assert body["object"] == "chat.completion" and body["model"] == "docq-sim"
    assert body["choices"][0]["message"] == {
        "role": "assistant", "content": '{"colour": "red"}', "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    tbody = text["response"]["body"]
    assert tbody["object"] == "text_completion" and tbody["choices"][0]["text"] == " there was"
    assert tbody["choices"][0]["finish_reason"] == "length" and tbody["usage"]["total_tokens"] == 5


def test_failures_carry_openais_error_shapes(
    store: tuple[sessionmaker[Session], Settings], tmp_path: Path
) -> None:
    # Given the finished job's error file
    job_id = finished_job(store, tmp_path)
    _, _, errors = write(store, tmp_path, job_id)
    by_line = dict(zip(["broken", "no-prompt", "too-long", "gave-up", "timed-out", "never-ran",
                        "repeat"], errors, strict=True))
    # Then a line that could not be a request has no response, only an error naming the line
    assert by_line["broken"]["response"] is None
    assert by_line["broken"]["error"]["code"] == "invalid_json"
    assert "b.jsonl line 3 is not valid JSON" in by_line["broken"]["error"]["message"]
    assert by_line["repeat"]["error"]["code"] == "duplicate_custom_id"
    assert "line 9 repeats the custom_id 'chat-ok' of line 1" in by_line["repeat"]["error"][
        "message"]
    # And a bad body is the 400 the endpoint would have answered
    bad = by_line["no-prompt"]
    assert bad["error"] is None and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert bad["response"]["body"]["error"]["param"] == "prompt"
    assert bad["response"]["body"]["error"]["code"] == "missing_required_parameter"
    # And a provider error keeps its status, code and message
    over = by_line["too-long"]["response"]
    assert over["status_code"] == 400 and over["body"]["error"]["code"] == (
        "context_length_exceeded")
    assert over["body"]["error"]["message"].startswith("This model's maximum context length")
    limited = by_line["gave-up"]["response"]
    assert limited["status_code"] == 429
    assert limited["body"]["error"]["code"] == "rate_limit_exceeded"
    assert limited["body"]["error"]["message"].startswith("gave up after 5 attempts")
    # And failures without an HTTP answer, or without a result, are errors with a code
    assert by_line["timed-out"]["response"] is None
    assert by_line["timed-out"]["error"]["code"] == "request_timeout"
    assert by_line["never-ran"]["error"]["code"] == "not_finished"


def test_a_cancelled_jobs_unfinished_requests_are_batch_cancelled(
    store: tuple[sessionmaker[Session], Settings], tmp_path: Path
) -> None:
    # Given a job cancelled before one request ran
    job_id = finished_job(store, tmp_path)
    sessions, _ = store
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLED))
    # When its files are written / Then that request is reported as batch_cancelled
    _, _, errors = write(store, tmp_path, job_id)
    never = next(r for r in errors if r["custom_id"] == "never-ran")
    assert never["error"]["code"] == "batch_cancelled"


def test_results_are_refused_while_the_job_runs_and_for_other_pipelines(
    store: tuple[sessionmaker[Session], Settings], tmp_path: Path
) -> None:
    sessions, settings = store
    # Given a running openai-batch job and a summarize job
    path = tmp_path / "b.jsonl"
    path.write_text(line("a") + "\n")
    job_id, _ = submit_file(store, path)
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING))
        other = create_job(s, settings, build_pipeline("summarize", {})).id
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    with sessions() as session:
        # When their files are asked for / Then each refusal says why
        with pytest.raises(JobNotFinishedError, match=f"job {job_id} is still running"):
            write_openai_batch_results(session, job_id, out, err)
        with pytest.raises(InputError, match="ran the 'summarize' pipeline"):
            write_openai_batch_results(session, other, out, err)
        with pytest.raises(LookupError, match="job 999 does not exist"):
            write_openai_batch_results(session, 999, out, err)
    assert not os.path.exists(out)
