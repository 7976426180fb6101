"""The public face: what `from docqueue import ...` gives, and the typed records the API returns.

The records are TypedDicts whose JSON is what `docq status --json` and `docq results` print, so
their keys are a contract: the key lists below are that output as it was before the records
were typed, and a change to them is a change of the CLI's output.
"""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path
from typing import get_type_hints

import docqueue
from docqueue import (
    FINAL_JOB_STATES,
    ChunkResult,
    DocumentResult,
    DocumentStatus,
    JobInfo,
    JobStatus,
    Lane,
    ProviderBatchInfo,
    ResultStatus,
    Trouble,
    WorkerError,
)
from docqueue.models import LedgerState

ROOT = Path(__file__).resolve().parents[2]

JOB_KEYS = [
    "id", "name", "status", "reason", "pipeline", "model", "endpoint", "documents_total",
    "documents_rejected", "chunks_total", "batches_total", "chunks_done", "chunks_retrying",
    "chunks_by_state", "reduce_steps_done", "tokens_in", "tokens_in_cached", "tokens_out", "cost",
    "prompt_cache_share", "prompt_cache_saved", "latency_p50_ms", "latency_p95_ms",
    "chunks_per_s", "created_at", "submitted_at", "finished_at", "lane", "provider_batches",
    "trouble",  # added later: a new key keeps every script that reads the others working
    "ingesting", "ingested_at",  # streaming submission (issue 30), added the same way
]
DOCUMENT_KEYS = ["id", "source", "status", "output", "error", "chunks", "tokens_in",
                 "tokens_out", "cost", "content_hash", "metadata"]
CHUNK_KEYS = ["id", "chunk", "char_start", "char_end", "tokens", "status", "output", "error",
              "tokens_in", "tokens_out"]
PROVIDER_BATCH_KEYS = ["ledger", "id", "state", "status", "requests", "completed", "failed",
                       "age_s"]
TROUBLE_KEYS = ["cause", "service", "detail", "since", "for_s", "failures", "retry_s", "doing",
                "message"]


def a_job() -> JobInfo:
    return {
        "id": 7, "name": None, "status": JobStatus.PARTIAL, "reason": "3 chunks failed",
        "pipeline": "summarize", "model": "gpt-4o-mini", "endpoint": "http://127.0.0.1:1/v1",
        "documents_total": 2, "documents_rejected": 0, "chunks_total": 5, "batches_total": 1,
        "chunks_done": 5, "chunks_retrying": 0,
        "chunks_by_state": {ResultStatus.OK: 2, ResultStatus.ERROR: 3},
        "reduce_steps_done": 0, "tokens_in": 100, "tokens_in_cached": 0, "tokens_out": 20,
        "cost": None, "prompt_cache_share": 0.0, "prompt_cache_saved": None,
        "latency_p50_ms": 12.5, "latency_p95_ms": 40.0, "chunks_per_s": 3.0,
        "created_at": "2025-01-01T00:00:00+00:00", "submitted_at": None, "finished_at": None,
        "lane": Lane.BATCH,
        "provider_batches": [{"ledger": 1, "id": "batch_1", "state": LedgerState.CREATED,
                              "status": "in_progress", "requests": 5, "completed": 2,
                              "failed": 0, "age_s": 3.5}],
        "trouble": None, "ingesting": False, "ingested_at": None,
    }


def test_every_public_name_is_importable_and_listed_once() -> None:
    # Given the package's declared public names
    names = docqueue.__all__
    # Then each is there, none twice, and the README's and the API's names are among them
    assert len(set(names)) == len(names)
    assert all(hasattr(docqueue, name) for name in names)
    for needed in ("submit", "JobHandle", "JobInfo", "DocumentResult", "JobStatus",
                   "DocumentStatus", "ResultStatus", "WorkerError", "SubmitReport"):
        assert needed in names, needed
    # And the error base class is the root every error of docqueue's derives from
    assert issubclass(docqueue.NothingToSubmitError, WorkerError)
    assert issubclass(docqueue.JobStalledError, WorkerError)


def test_the_records_declare_the_keys_the_cli_prints_all_required() -> None:
    # Given each record type and the keys its JSON had before it was typed
    for record, keys in ((JobInfo, JOB_KEYS), (DocumentResult, DOCUMENT_KEYS),
                         (ChunkResult, CHUNK_KEYS), (ProviderBatchInfo, PROVIDER_BATCH_KEYS),
                         (Trouble, TROUBLE_KEYS)):
        # Then it declares exactly those keys, in that order, every one always present
        assert list(get_type_hints(record)) == keys, record.__name__
        assert record.__required_keys__ == frozenset(keys), record.__name__


def test_states_serialize_as_the_plain_strings_they_were() -> None:
    # Given a job status holding enum members, as job_status() returns it
    job = a_job()
    # When it is written as JSON / Then every state is its plain string, nothing else changes
    plain = json.loads(json.dumps(job))
    assert plain["status"] == "partial" and plain["lane"] == "batch"
    assert plain["chunks_by_state"] == {"ok": 2, "error": 3}
    assert plain["provider_batches"][0]["state"] == "created"
    assert json.dumps(job) == json.dumps({**plain})
    # And a state still compares equal to its string, as scripts compare it
    assert job["status"] == "partial" and job["status"] in FINAL_JOB_STATES
    assert f"{job['status']}" == "partial"


def test_a_document_result_writes_the_same_csv_row_as_a_plain_dict() -> None:
    # Given a document result with an enum state and the same record with plain strings
    doc: DocumentResult = {
        "id": "a.txt", "source": "docs/a.txt", "status": DocumentStatus.OK,
        "output": {"summary": "short"}, "error": None, "chunks": 1, "tokens_in": 10,
        "tokens_out": 2, "cost": 0.001, "content_hash": "ab", "metadata": {},
    }
    plain = json.loads(json.dumps(doc))

    def row(record: dict[str, object]) -> str:  # as `docq results --format csv` writes one
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=DOCUMENT_KEYS[:-1], extrasaction="ignore")
        writer.writerow(record | {"output": json.dumps(record["output"], ensure_ascii=False)})
        return out.getvalue()

    # When both are written / Then the rows are the same, the state as its plain string
    expected = 'a.txt,docs/a.txt,ok,"{""summary"": ""short""}",,1,10,2,0.001,ab\r\n'
    assert row(dict(doc)) == row(plain) == expected


def test_job_states_are_spelled_out_only_in_the_models() -> None:
    # Given every Python module of tasks/ and workers/ (the simulator speaks OpenAI's states)
    spelled = {str(JobStatus.SUCCEEDED), str(JobStatus.PARTIAL)}
    found = []
    for folder in ("tasks", "workers"):
        for path in (ROOT / folder).rglob("*.py"):
            if "simulator" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in spelled:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    # Then none writes a job's final state as a string: they use models' JobStatus
    assert found == []
