"""Tables in and out, end to end: `docq submit` of a Parquet file and a CSV by their columns,
real workers and the simulator, `docq results --format parquet`, `docq jobs`, `docq purge`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, select

from docqueue.models import Batch, Chunk, Document, Job, Result
from docqueue.tasks.api import JobHandle
from docqueue.tasks.runtime import runtime

DOCQ = [sys.executable, "-m", "docqueue.tasks.cli"]
LABELS = "billing,hardware,access"


def docq(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCQ_")}
    return subprocess.run([*DOCQ, *args], cwd=cwd, env={**base, **env}, text=True,
                          capture_output=True, timeout=180, check=False)


def tickets(n: int, prefix: str) -> dict[str, list[Any]]:
    return {"ticket_id": [f"{prefix}-{i}" for i in range(n)],
            "body": [f"Ticket {i}: the printer on floor {i % 7} jams and my invoice {i} is wrong"
                     for i in range(n)],
            "team": [("red", "blue", "green")[i % 3] for i in range(n)],
            "priority": [i % 5 for i in range(n)]}


def rows_of(job_id: int) -> dict[str, int]:
    with runtime().sessions() as s:
        counts = {t.__name__: s.scalar(select(func.count()).select_from(t)
                                       .where(t.job_id == job_id))
                  for t in (Document, Chunk, Batch, Result)}
        counts["Job"] = s.scalar(select(func.count()).select_from(Job).where(Job.id == job_id))
        return counts


def submitted(done: subprocess.CompletedProcess[str]) -> int:
    assert done.returncode == 0, done.stdout + done.stderr
    return int(json.loads(done.stdout)["job_id"])


def test_tables_go_in_by_their_columns_and_come_out_keyed_by_the_users_ids(
    simulator: Any, docq_env: Any, workers: Any, tmp_path: Path
) -> None:
    # Given a simulator, two worker processes, a 1,000-row Parquet file and a 500-row CSV
    env = docq_env(simulator("--seed", "3").url)
    workers(env)
    parquet = tmp_path / "tickets.parquet"
    pq.write_table(pa.table(tickets(1000, "P")), parquet, row_group_size=256)
    csv_path = tmp_path / "tickets.csv"
    data = tickets(500, "C")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(data))
        writer.writerows(zip(*data.values(), strict=True))
    # When both are submitted with their text and id columns named
    common = ["--pipeline", "classify", "--labels", LABELS, "--text-column", "body",
              "--id-column", "ticket_id", "--json"]
    first = submitted(docq(env, "submit", str(parquet), *common, "--name", "pq", cwd=tmp_path))
    second = submitted(docq(env, "submit", str(csv_path), *common, "--name", "cs", cwd=tmp_path))
    assert JobHandle(first).wait(timeout=240)["status"] == "succeeded"
    assert JobHandle(second).wait(timeout=240)["status"] == "succeeded"
    # Then the Parquet job's results come out as 1,000 rows keyed by the user's ids
    out = tmp_path / "out.parquet"
    done = docq(env, "results", str(first), "--format", "parquet", "--output", str(out),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out).to_pylist()
    assert len(table) == 1000
    assert [r["id"] for r in table] == [f"P-{i}" for i in range(1000)]
    # And each row carries its metadata, its label as a column and its status
    assert all(r["team"] == ("red", "blue", "green")[i % 3] and r["priority"] == i % 5
               for i, r in enumerate(table))
    assert {r["label"] for r in table} <= set(LABELS.split(",")) and table[0]["label"]
    assert {r["status"] for r in table} == {"ok"}
    # And the CSV's rows went in with theirs too
    with runtime().sessions() as s:
        meta = s.scalar(select(Document.meta).where(Document.job_id == second,
                                                    Document.external_id == "C-4"))
    assert meta == {"team": "blue", "priority": "4"}
    # And `docq jobs --json` lists both, newest first, with their names
    listed = json.loads(docq(env, "jobs", "--json", cwd=tmp_path).stdout)
    assert [(j["id"], j["name"]) for j in listed[:2]] == [(second, "cs"), (first, "pq")]
    assert listed[1]["chunks_done"] == listed[1]["chunks_total"] == 1000
    # When the first job is purged without a question
    done = docq(env, "purge", str(first), "--yes", cwd=tmp_path)
    # Then none of its rows are left, and the other job's are untouched
    assert done.returncode == 0, done.stderr
    assert rows_of(first) == {"Document": 0, "Chunk": 0, "Batch": 0, "Result": 0, "Job": 0}
    assert rows_of(second)["Document"] == 500 and rows_of(second)["Result"] == 500


def test_bad_tables_and_a_running_purge_each_give_one_line(
    simulator: Any, docq_env: Any, tmp_path: Path
) -> None:
    # Given a store and broker but no worker, a CSV without a 'body' column and a fake Parquet
    env = docq_env(simulator("--seed", "4").url)
    no_body = tmp_path / "t.csv"
    no_body.write_text("ticket_id,text\nA,hello\n")
    fake = tmp_path / "t.parquet"
    fake.write_text("ticket_id,body\nA,hello\n")
    args = ["--pipeline", "classify", "--labels", LABELS, "--text-column", "body",
            "--id-column", "ticket_id"]
    # When each is submitted
    missing = docq(env, "submit", str(no_body), *args, cwd=tmp_path)
    wrong = docq(env, "submit", str(fake), *args, cwd=tmp_path)
    # Then each gives one error line naming the file and the problem, and records no job
    assert missing.returncode == 2 and missing.stderr.splitlines() == [
        f"error: {no_body.as_posix()} has no column 'body'; its columns are: ticket_id, text"]
    assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1
    assert f"{fake.as_posix()} is not a readable Parquet file" in wrong.stderr
    with runtime().sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    # When a good table is submitted with no worker running, and purged at once
    good = tmp_path / "good.csv"
    good.write_text("ticket_id,body\nA,hello\nB,\nA,again\n")
    job = submitted(docq(env, "submit", str(good), *args, "--json", cwd=tmp_path))
    refused = docq(env, "purge", str(job), "--yes", cwd=tmp_path)
    # Then the rows with an empty text or a repeated id were rejected and the purge refused
    with runtime().sessions() as s:
        errors = list(s.scalars(select(Document.error).where(Document.job_id == job)
                                .order_by(Document.id)))
    assert errors == [None, f"{good.as_posix()} row 2 has no text (its 'body' is empty).",
                      f"{good.as_posix()} row 3 repeats the id 'A' of an earlier row."]
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"error: job {job} is still running: cancel it first (docq cancel {job}); "
        "nothing was purged"]


def test_beat_purges_the_jobs_past_the_retention_and_only_those(
    simulator: Any, docq_env: Any, workers: Any, tmp_path: Path
) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from docqueue.tasks.celery import app
    from docqueue.tasks.lifecycle import retention_entry
    from docqueue.workers.clock import utc_now

    # Given a worker told to keep finished jobs for 30 days, and two finished jobs, one of
    # which finished 40 days ago
    env = docq_env(simulator("--seed", "5").url, retention_days=30)
    workers(env)
    old, recent = (submitted(docq(env, "submit", str(_notes(tmp_path, name)), "--json",
                                  cwd=tmp_path)) for name in ("old", "recent"))
    for job in (old, recent):
        assert JobHandle(job).wait(timeout=120)["status"] == "succeeded"
    with runtime().sessions.begin() as s:
        s.execute(update(Job).where(Job.id == old)
                  .values(finished_at=utc_now() - timedelta(days=40)))
    # When beat's retention entry comes due (the task it names, sent to the worker)
    entry = retention_entry(runtime().settings)["jobs-retention"]
    report = app.send_task(entry["task"]).get(timeout=60)
    # Then the old job's rows are gone and the recent one's are all there
    assert report == {"purged": 1, "documents": 3}, report
    assert rows_of(old) == {"Document": 0, "Chunk": 0, "Batch": 0, "Result": 0, "Job": 0}
    assert rows_of(recent)["Document"] == 3 and rows_of(recent)["Result"] == 3


def _notes(folder: Path, name: str) -> Path:
    """A folder of three short notes to submit."""
    path = folder / name
    path.mkdir()
    for i in range(3):
        (path / f"{i}.txt").write_text(f"Note {i} of {name}: the ferry leaves at nine.")
    return path
