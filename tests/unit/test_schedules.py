"""Schedules: cron windows in a time zone, the schedule file's errors, and what a run ingests.

The store functions run on SQLite here (no server); tests/integration/test_operate.py runs the
whole thing on PostgreSQL with real workers.
"""

from __future__ import annotations

import hashlib
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery.beat import BeatLazyFunc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import Document, Job, make_sessionmaker
from docqueue.models.tables import RunStatus, ScheduleDocument, ScheduleRun
from docqueue.tasks.beat import CronSchedule, beat_entries, current_window
from docqueue.workers.ingest.documents import SourceDocument
from docqueue.workers.jobs.cron import Cron
from docqueue.workers.jobs.schedule_runs import (
    RunCounts,
    changed_documents,
    claim_window,
    finish_ingest,
    run_state,
    settle_runs,
)
from docqueue.workers.jobs.schedules import ScheduleError, load_schedules


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# -- cron windows -------------------------------------------------------------------------------


def test_a_window_starts_at_the_latest_fire_time_at_or_before_now() -> None:
    # Given a schedule every five minutes
    cron = Cron.parse("*/5 * * * *")
    # When we ask for the window of times inside, at and just before a boundary
    # Then the window is the fire time at or before it, and the next fire is strictly after
    assert cron.window_at(utc(2026, 5, 1, 12, 7, 30)) == utc(2026, 5, 1, 12, 5)
    assert cron.window_at(utc(2026, 5, 1, 12, 10)) == utc(2026, 5, 1, 12, 10)
    assert cron.window_at(utc(2026, 5, 1, 12, 9, 59, 999999)) == utc(2026, 5, 1, 12, 5)
    assert cron.next_after(utc(2026, 5, 1, 12, 10)) == utc(2026, 5, 1, 12, 15)


def test_a_schedule_fires_on_its_own_time_zones_clock() -> None:
    # Given 02:30 on weekdays in Berlin (UTC+2 in summer, UTC+1 in winter)
    cron = Cron.parse("30 2 * * 1-5", "Europe/Berlin")
    # When we look around a Friday in summer and one in winter
    summer = cron.window_at(utc(2026, 7, 3, 12, 0))  # Friday
    winter = cron.next_after(utc(2026, 1, 9, 0, 0))  # Friday
    # Then the windows are 02:30 Berlin time in UTC, and the weekend is skipped
    assert summer == utc(2026, 7, 3, 0, 30)
    assert winter == utc(2026, 1, 9, 1, 30)
    assert cron.next_after(summer) == utc(2026, 7, 6, 0, 30)  # Monday


def test_daylight_saving_time_follows_cron() -> None:
    # Given a fixed-time and a wildcard schedule in Berlin
    fixed = Cron.parse("30 2 * * *", "Europe/Berlin")
    hourly = Cron.parse("30 * * * *", "Europe/Berlin")
    # When the clocks go back (2026-10-25: 02:00-03:00 happens twice)
    autumn_fixed = [fixed.next_after(utc(2026, 10, 24, 12, 0))]
    autumn_fixed.append(fixed.next_after(autumn_fixed[0]))
    start = utc(2026, 10, 24, 23, 0)
    autumn_hourly = []
    for _ in range(3):
        start = hourly.next_after(start)
        autumn_hourly.append(start)
    # Then the fixed-time schedule fires once that night, the wildcard one at each 02:30
    assert autumn_fixed == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    assert autumn_hourly == [utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 0, 30),
                             utc(2026, 10, 25, 1, 30)]
    assert fixed.window_at(utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 0, 30)
    # and when the clocks go forward (02:30 does not exist) it fires at the jump, 03:00
    assert fixed.next_after(utc(2026, 3, 28, 12, 0)) == utc(2026, 3, 29, 1, 0)


@pytest.mark.parametrize(
    ("expr", "zone", "message"),
    [
        ("*/5 * * *", "UTC", "has 4 fields; it needs five"),
        ("0 */5 * * * *", "UTC", "has 6 fields; it needs five"),
        ("@daily", "UTC", "has 1 fields; it needs five"),
        ("61 * * * *", "UTC", "cron '61 * * * *' is not valid"),
        ("0 0 * * funday", "UTC", "cron '0 0 * * funday' is not valid"),
        ("0 0 31 2 *", "UTC", "cron '0 0 31 2 *' never fires"),
        ("0 0 * * *", "Mars/Olympus", "timezone 'Mars/Olympus' is not a known IANA zone"),
    ],
)
def test_a_bad_cron_or_zone_is_explained(expr: str, zone: str, message: str) -> None:
    # Given a bad expression or zone / When it is parsed / Then the message says what is wrong
    with pytest.raises(ValueError) as caught:  # noqa: PT011 - the message is checked below
        Cron.parse(expr, zone)
    assert message in str(caught.value)


# -- the schedule file --------------------------------------------------------------------------

GOOD = """
[[schedule]]
name = "news"
source = "corpus"
pipeline = "classify"
options = { labels = ["sport", "politics"] }
cron = "*/10 * * * *"
timezone = "America/New_York"

[[schedule]]
name = "notes"
source = "corpus/**/*.md"
pipeline = "summarize"
cron = "0 6 * * *"
"""


def schedule_file(tmp_path: Path, text: str) -> Path:
    (tmp_path / "corpus").mkdir(exist_ok=True)
    path = tmp_path / "docq.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_schedule_file_is_read_with_sources_relative_to_it(tmp_path: Path) -> None:
    # Given a file with two schedules and relative sources
    path = schedule_file(tmp_path, GOOD)
    # When it is loaded
    news, notes = load_schedules(path)
    # Then each schedule has its pipeline, options, cron and zone, and an absolute source
    assert (news.name, news.pipeline, news.options) == (
        "news", "classify", {"labels": ["sport", "politics"]})
    assert news.source == str(tmp_path / "corpus")
    assert (news.cron.expr, news.cron.timezone) == ("*/10 * * * *", "America/New_York")
    assert notes.source == str(tmp_path / "corpus/**/*.md")
    assert notes.cron.timezone == "UTC" and notes.options == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("*/10 * * * *", "*/10 * * 13 *"), "schedule 'news': cron '*/10 * * 13 *' is not valid"),
        (('"classify"', '"clasify"'), "schedule 'news': unknown pipeline 'clasify'"),
        (('labels = ["sport", "politics"]', 'labels = ["sport"]'),
         "schedule 'news': classify: option 'labels' must be a list of at least 2 labels"),
        (('source = "corpus"', 'source = "missing"'), "schedule 'news': the source "),
        (('"corpus/**/*.md"', '"nowhere/**/*.md"'), "schedule 'notes': the source "),
        (("America/New_York", "America/Gotham"),
         "schedule 'news': timezone 'America/Gotham' is not a known IANA zone name"),
        (('name = "notes"', 'name = "news"'), "two schedules are named 'news'"),
        (("timezone =", "time_zone ="), "schedule 'news': unknown key 'time_zone'"),
        (('cron = "0 6 * * *"', ""), "schedule 'notes' needs 'cron' as a non-empty string"),
        (("options = {", "options = { prompts = 1,"), "schedule 'news': unknown option 'prompts'"),
        (("[[schedule]]", "[[schedules]]"), "unknown key 'schedules'; schedules go in"),
        (('name = "news"', "name = 3"), "schedule #1 needs a 'name'"),
        (("[[schedule]]", "[[schedule]"), "is not valid TOML"),
    ],
)
def test_each_bad_schedule_is_a_start_up_error_naming_it(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    # Given a schedule file with one mistake
    path = schedule_file(tmp_path, GOOD.replace(*change, 1))
    # When it is loaded
    with pytest.raises(ScheduleError) as caught:
        load_schedules(path)
    # Then the error names the file and the schedule, and says what is wrong
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    # Given no file / When it is loaded / Then the error names it
    with pytest.raises(ScheduleError, match=r"cannot read the schedule file .*docq\.toml"):
        load_schedules(tmp_path / "docq.toml")


# -- beat ---------------------------------------------------------------------------------------


def test_the_beat_schedule_is_due_once_per_window_and_survives_pickling() -> None:
    # Given a beat schedule every minute in Tokyo
    sched = CronSchedule(Cron.parse("* * * * *", "Asia/Tokyo"))
    now = datetime.now(UTC)
    window = Cron("* * * * *").window_at(now)
    # When beat asks whether it is due after runs before and in the current window
    due_before, next_s = sched.is_due(window - timedelta(seconds=1))
    due_after, _ = sched.is_due(window + timedelta(milliseconds=1))
    # Then it is due only when the last run is before the window, and next comes within 60 s
    assert due_before and not due_after
    assert 0 < next_s <= 60
    # and the shelve can store it and read it back
    assert pickle.loads(pickle.dumps(sched)) == sched


def test_beat_entries_send_the_schedule_name_and_the_window_due_now(tmp_path: Path) -> None:
    # Given a loaded schedule file
    schedules = load_schedules(schedule_file(tmp_path, GOOD))
    # When beat entries are built and beat evaluates the arguments of one
    entries = beat_entries(schedules)
    entry = entries["schedule:news"]
    name, lazy = entry["args"]
    # Then the task is schedules.run with the name and the current window in UTC
    assert entry["task"] == "schedules.run" and name == "news"
    assert isinstance(lazy, BeatLazyFunc)
    window = datetime.fromisoformat(lazy())
    assert window == Cron.parse("*/10 * * * *", "America/New_York").window_at(datetime.now(UTC))
    assert window.minute % 10 == 0 and window.utcoffset() == timedelta(0)
    assert entry["options"]["expires"] == 600.0
    assert current_window("0 6 * * *", "UTC").endswith("T06:00:00+00:00")


# -- what a run ingests -------------------------------------------------------------------------


@pytest.fixture
def store(sqlite_url: str) -> sessionmaker[Session]:
    maker = make_sessionmaker(sqlite_url)
    yield maker  # type: ignore[misc]
    maker.kw["bind"].dispose()


def doc(external_id: str, text: str) -> SourceDocument:
    digest = hashlib.sha256(text.encode()).hexdigest()
    return SourceDocument(external_id, None, text, digest, len(text))


def job_with(session: Session, status: str, docs: dict[str, tuple[str, str]]) -> int:
    job = Job(pipeline="summarize", pipeline_version="v", endpoint="x", model="m", mode="chat",
              status=status)
    session.add(job)
    session.flush()
    for external_id, (text, doc_status) in docs.items():
        session.add(Document(job_id=job.id, external_id=external_id, status=doc_status,
                             content_hash=doc(external_id, text).content_hash))
    return job.id


def run_once(store: sessionmaker[Session], docs: list[SourceDocument]) -> tuple[
        list[str], RunCounts]:
    counts = RunCounts()
    out = [d.external_id for d in changed_documents(store, "s", docs, counts)]
    return out, counts


def test_a_run_sends_new_and_changed_documents_and_the_baseline_moves_on_success(
    store: sessionmaker[Session],
) -> None:
    # Given a first run whose job succeeded with a, b ok and c in error
    with store.begin() as s:
        first = claim_window(s, "s", utc(2026, 1, 1))
        assert first is not None
        job = job_with(s, "partial", {"a": ("A", "ok"), "b": ("B", "ok"), "c": ("C", "error")})
        finish_ingest(s, first, RunCounts(seen=3, new=3), job)
    # When the next run settles the first and reads a (same), b (edited), c (same), d (new)
    with store.begin() as s:
        second = claim_window(s, "s", utc(2026, 1, 2))
        assert second is not None
        busy = settle_runs(s, "s", second)
    sent, counts = run_once(store, [doc("a", "A"), doc("b", "B2"), doc("c", "C"), doc("d", "D")])
    # Then the first run is partial, only ok documents joined the baseline, and the run sends
    # the changed b, the failed c again, and the new d
    assert busy is None
    with store() as s:
        assert s.get(ScheduleRun, first).status == RunStatus.PARTIAL  # type: ignore[union-attr]
        baseline = dict(s.execute(select(ScheduleDocument.external_id,
                                         ScheduleDocument.content_hash)).all())
    assert set(baseline) == {"a", "b"}
    assert sent == ["b", "c", "d"]
    assert (counts.seen, counts.new, counts.changed, counts.unchanged) == (4, 2, 1, 1)


def test_a_failed_job_leaves_the_baseline_and_a_running_one_makes_the_next_run_skip(
    store: sessionmaker[Session],
) -> None:
    # Given a run whose job failed and a later run whose job is still running
    with store.begin() as s:
        failed = claim_window(s, "s", utc(2026, 1, 1))
        finish_ingest(s, failed, RunCounts(), job_with(s, "failed", {"a": ("A", "error")}))
        running = claim_window(s, "s", utc(2026, 1, 2))
        finish_ingest(s, running, RunCounts(), job_with(s, "running", {"b": ("B", "pending")}))
        # and a run that claimed a window long ago and never finished reading
        dead = claim_window(s, "s", utc(2026, 1, 3))
        s.execute(ScheduleRun.__table__.update().where(ScheduleRun.id == dead)
                  .values(started_at=datetime.now(UTC) - timedelta(hours=1)))
    # When a new window settles the earlier runs
    with store.begin() as s:
        current = claim_window(s, "s", utc(2026, 1, 4))
        busy = settle_runs(s, "s", current)  # type: ignore[arg-type]
    # Then the failed run is failed without moving the baseline, the dead one is abandoned,
    # and the new one must skip because the running job's documents are not settled yet
    with store() as s:
        rows = {r.id: r for r in s.scalars(select(ScheduleRun))}
        assert s.scalar(select(ScheduleDocument.external_id)) is None
    assert rows[failed].status == "failed" and "ended failed" in rows[failed].reason
    assert rows[dead].status == "failed" and "abandoned" in rows[dead].reason
    assert rows[running].status == "running"
    assert busy is not None and "is still going" in busy and "is running" in busy


def test_a_window_is_claimed_once(store: sessionmaker[Session]) -> None:
    # Given a claimed window
    with store.begin() as s:
        first = claim_window(s, "s", utc(2026, 1, 1, 3))
    # When the same window is claimed again, and the same instant in another zone
    with store.begin() as s:
        again = claim_window(s, "s", utc(2026, 1, 1, 3))
        same = claim_window(s, "s", datetime.fromisoformat("2026-01-01T04:00:00+01:00"))
        other = claim_window(s, "t", utc(2026, 1, 1, 3))
    # Then only the first claim of that schedule and window wins
    assert first is not None and again is None and same is None and other is not None


def test_unreadable_documents_are_counted_not_sent(store: sessionmaker[Session]) -> None:
    # Given one good and one unreadable document
    bad = SourceDocument("x.bin", "x.bin", None, None, 3, error="x.bin is binary")
    # When a run reads them
    sent, counts = run_once(store, [doc("a", "A"), bad])
    # Then only the good one is sent and the reason is kept
    assert sent == ["a"]
    assert counts.rejected == 1 and counts.rejections == ["x.bin is binary"]


@pytest.mark.parametrize(
    ("status", "job_status", "shown"),
    [
        ("running", "running", "running"),
        ("running", "pending", "running"),
        ("running", "succeeded", "succeeded"),
        ("running", "partial", "partial"),
        ("running", "failed", "failed"),
        ("running", "cancelled", "failed"),
        ("running", None, "failed"),
        ("unchanged", None, "unchanged"),
        ("succeeded", "succeeded", "succeeded"),
    ],
)
def test_a_run_reads_as_its_job_ended(status: str, job_status: str | None, shown: str) -> None:
    # Given a run still `running` in the store after its job ended (settled at the next run)
    # When it is shown / Then it reads as it will be settled, never "running, job succeeded"
    assert run_state(RunStatus(status), job_status) == shown
