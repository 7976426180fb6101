"""Operating docqueue with real processes: schedules under beat, Flower, live progress.

Workers, beat and Flower are real subprocesses on the test's Redis DB and PostgreSQL schema;
the model is the simulator.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import select, text

from docqueue.models import Document, Job
from docqueue.models.tables import ScheduleRun
from docqueue.tasks import beat as beat_tasks  # not its task: pytest would configure the app
from docqueue.tasks.api import JobHandle, submit
from docqueue.tasks.flower import FlowerAuthError, basic_auth
from docqueue.tasks.progress import Rates, watch
from docqueue.tasks.runtime import runtime
from docqueue.workers import keys
from docqueue.workers.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCQ = [sys.executable, "-c", "from docqueue.tasks.cli import main; main()"]


class Service:
    """A docq or celery subprocess with its log in a file, stopped at teardown."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"no {pattern!r} after {timeout_s}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> Service:
        service = Service(argv, env, tmp_path / f"{name}.log")
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()


def start_worker(services: Callable[..., Service], env: dict[str, str], name: str) -> Service:
    # tasks.beat holds schedules.run; include it whatever the app's own include list says.
    worker = services(name, [
        sys.executable, "-m", "celery", "-A", "docqueue.tasks", "worker", "--pool=prefork",
        "--concurrency=2", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--events",
        "--include=tasks.beat", f"--hostname={name}@%h"], env)
    worker.wait_for(r"ready\.")
    return worker


def docq(
    env: dict[str, str], *args: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DOCQ, *args], cwd=ROOT, env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


# -- schedules ----------------------------------------------------------------------------------


SCHEDULE = """
[[schedule]]
name = "harbour"
source = "corpus"
pipeline = "summarize"
cron = "* * * * *"
timezone = "Pacific/Auckland"
"""


@pytest.fixture
def scheduled(docq_env: Any, simulator: Any, tmp_path: Path) -> dict[str, str]:
    """A corpus of three documents, a schedule file over it, and the environment."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a", "b", "c"):
        (corpus / f"{name}.txt").write_text(f"Document {name}. The boats came back at noon.\n")
    (tmp_path / "docq.toml").write_text(SCHEDULE)
    sim = simulator("--seed", "4")
    return docq_env(sim.url, config=tmp_path / "docq.toml", chunk_tokens=60,
                    chunk_overlap_tokens=0)


def run_window(window: datetime, timeout_s: float = 60) -> dict[str, Any]:
    result: dict[str, Any] = beat_tasks.run_schedule.delay("harbour", window.isoformat()).get(
        timeout=timeout_s)
    return result


def job_documents(job_id: int) -> list[str]:
    with runtime().sessions() as s:
        return list(s.scalars(select(Document.external_id).where(Document.job_id == job_id)
                              .order_by(Document.external_id)))


def run_rows() -> list[ScheduleRun]:
    with runtime().sessions() as s:
        return list(s.scalars(select(ScheduleRun).order_by(ScheduleRun.window_start)))


def test_the_second_run_ingests_only_new_and_changed_documents(
    scheduled: dict[str, str], services: Any, tmp_path: Path, redis_client: redis.Redis,
) -> None:
    # Given workers and a first run over three documents that completed
    start_worker(services, scheduled, "w0")
    w1 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    first = run_window(w1)
    assert first["status"] == "running", first
    assert job_documents(first["job_id"]) == ["a.txt", "b.txt", "c.txt"]
    assert JobHandle(first["job_id"]).wait(timeout=60)["status"] == "succeeded"
    # When b changes, d appears, and the next window runs
    (tmp_path / "corpus" / "b.txt").write_text("Document b, edited: the boats stayed in.\n")
    (tmp_path / "corpus" / "d.txt").write_text("Document d. A new arrival on the quay.\n")
    second = run_window(w1 + timedelta(minutes=1))
    # Then its job holds only b and d, the run counts what it saw, and the first run is settled
    assert second["status"] == "running", second
    assert job_documents(second["job_id"]) == ["b.txt", "d.txt"]
    rows = run_rows()
    assert [r.status for r in rows] == ["succeeded", "running"]
    assert (rows[1].documents_seen, rows[1].documents_new, rows[1].documents_changed,
            rows[1].documents_unchanged) == (4, 1, 1, 2)
    assert JobHandle(second["job_id"]).wait(timeout=60)["status"] == "succeeded"

    # When another run holds the schedule's lock while a window comes
    lock = redis_client.lock(keys.schedule_lock("harbour"), timeout=30)
    assert lock.acquire(blocking=False)
    overlapping = run_window(w1 + timedelta(minutes=2))
    lock.release()
    # Then that window is skipped, and the next one finds nothing new and starts no job
    quiet = run_window(w1 + timedelta(minutes=3))
    assert overlapping["status"] == "skipped" and quiet["status"] == "unchanged", (
        overlapping, quiet)
    rows = run_rows()
    assert [r.status for r in rows] == ["succeeded", "succeeded", "skipped", "unchanged"]
    assert "still reading its source" in (rows[2].reason or "")
    assert rows[3].job_id is None and rows[3].documents_unchanged == 4

    # and `docq schedules` lists the schedule with its last and next run (the clock read
    # before the command: one read after it may be past a minute boundary that the command's
    # next run, the first after its own clock, falls on)
    asked_at = datetime.now(UTC)
    listed = docq(scheduled, "schedules", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "harbour" and entry["timezone"] == "Pacific/Auckland"
    assert entry["last_run"]["status"] == "unchanged"
    assert entry["last_run"]["window_start"] == (w1 + timedelta(minutes=3)).isoformat()
    assert datetime.fromisoformat(entry["next_run"]) > asked_at


def test_two_ticks_of_one_window_make_one_run(
    scheduled: dict[str, str], services: Any
) -> None:
    # Given two worker processes that can take a message each
    start_worker(services, scheduled, "w0")
    window = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    # When the same window is sent twice at once (two beats)
    sent = [beat_tasks.run_schedule.delay("harbour", window.isoformat()) for _ in range(2)]
    results = sorted(r.get(timeout=60)["status"] for r in sent)
    # Then one ran and the other found the window taken: one row, one job
    assert results == ["duplicate", "running"]
    [row] = run_rows()
    assert row.job_id is not None and row.documents_new == 3
    with runtime().sessions() as s:
        assert s.scalar(select(text("count(*)")).select_from(Job)) == 1


def test_two_beats_started_by_mistake_still_make_one_run(
    scheduled: dict[str, str], services: Any, tmp_path: Path
) -> None:
    # Given workers and two beat processes (two homes, as on two machines), every minute
    worker = start_worker(services, scheduled, "w0")
    while datetime.now(UTC).second > 40:  # both must be up before the same minute ends
        time.sleep(0.5)
    beats = [services(f"beat{i}", [*DOCQ, "beat"], {**scheduled,
                                                     "DOCQ_HOME": str(tmp_path / f"home{i}")})
             for i in range(2)]
    for beat in beats:
        beat.wait_for(r"beat: Starting")
    # When the next minute comes and both send the window
    for beat in beats:
        beat.wait_for(r"Sending due task schedule:harbour", timeout_s=75)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(r.job_id for r in run_rows()):
        time.sleep(0.5)
    time.sleep(2)  # let the second tick land too
    # Then there is one run of that window, with one job of the three documents
    rows = run_rows()
    assert len(rows) == 1, [(r.window_start, r.status) for r in rows]
    assert rows[0].status == "running" and rows[0].documents_new == 3
    assert rows[0].window_start.second == 0
    log = worker.log()
    assert log.count("'status': 'running'") == 1 and log.count("'status': 'duplicate'") == 1
    for beat in beats:
        assert "Traceback" not in beat.log()


def test_beat_runs_the_reconciler_as_often_as_configured(
    scheduled: dict[str, str], services: Any
) -> None:
    # Given `docq beat` with the reconciler every second (the default is a minute)
    beat = services("beat", [*DOCQ, "beat"], {**scheduled, "DOCQ_RECONCILE_EVERY_S": "1"})
    beat.wait_for(r"beat: Starting")
    # When it has run for a few seconds
    time.sleep(4.5)
    # Then it sent the reconciler about once a second
    assert beat.log().count("Sending due task jobs-reconcile") >= 3, beat.log()[-3000:]


def test_bad_schedules_stop_beat_with_a_message_naming_them(
    scheduled: dict[str, str], tmp_path: Path
) -> None:
    # Given schedule files with a bad cron, an unknown pipeline and a missing source
    cases = {
        'cron = "* * * * *"': ('cron = "* * 32 * *"', "schedule 'harbour': cron '* * 32 * *'"),
        'pipeline = "summarize"': ('pipeline = "sumarize"', "unknown pipeline 'sumarize'"),
        'source = "corpus"': ('source = "gone"', "schedule 'harbour': the source "),
    }
    for old, (new, message) in cases.items():
        (tmp_path / "docq.toml").write_text(SCHEDULE.replace(old, new))
        # When beat starts
        done = docq(scheduled, "beat")
        # Then it stops at once with the message and no traceback
        assert done.returncode == 2, done
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


# -- Flower, and the secrets that must not leak --------------------------------------------------


def settings_with(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_flower_needs_credentials_unless_local_and_explicit() -> None:
    # Given settings without credentials, with half of them, and with both
    bare, half = settings_with(), settings_with(flower_user="ops")
    full = settings_with(flower_user="ops", flower_password=SecretStr("pw:with,commas"))
    # When Flower's credentials are worked out / Then only a full pair or loopback+flag passes
    with pytest.raises(FlowerAuthError, match="set DOCQ_FLOWER_USER and DOCQ_FLOWER_PASSWORD"):
        basic_auth(bare, "127.0.0.1", insecure_local=False)
    with pytest.raises(FlowerAuthError, match="DOCQ_FLOWER_PASSWORD is not set"):
        basic_auth(half, "127.0.0.1", insecure_local=True)
    with pytest.raises(FlowerAuthError, match="needs a loopback --address"):
        basic_auth(bare, "0.0.0.0", insecure_local=True)
    assert basic_auth(bare, "::1", insecure_local=True) is None
    assert basic_auth(full, "0.0.0.0", insecure_local=False) == "ops:pw:with,commas"


def fetch(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def redis_dump(client: redis.Redis) -> tuple[bytes, int]:
    """Every key and value of the DB, with kombu's base64 message bodies decoded too."""
    out, bodies = [], 0
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [k + b"=" + v for k, v in client.hgetall(key).items()]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [json.dumps(str(e)).encode() for e in client.xrange(key)]
        out.append(key)
        for value in values:
            out.append(value)
            for body in _message_bodies(value):
                out.append(body)
                bodies += 1
    return b"\n".join(out), bodies


def _message_bodies(value: bytes) -> list[bytes]:
    found = []
    for match in re.finditer(rb'"body": "([A-Za-z0-9+/=]+)"', value):
        try:
            found.append(base64.b64decode(match.group(1), validate=True))
        except ValueError:
            continue
    return found


def test_no_key_or_document_text_reaches_flower_redis_logs_or_the_cli(
    simulator: Any, docq_env: Any, workers: Any, services: Any, redis_client: redis.Redis,
) -> None:
    # Given a provider that requires a secret key, and Flower with credentials
    key = f"sk-planted-{uuid.uuid4().hex}"
    marker = f"The lighthouse keeper {uuid.uuid4().hex[:12]} counted gulls."
    password = uuid.uuid4().hex
    sim = simulator("--api-key", key, "--seed", "9")
    env = docq_env(sim.url, llm_api_key=key, flower_user="ops", flower_password=password,
                   chunk_tokens=40, chunk_overlap_tokens=0, batch_max_chunks=3)
    port = free_port()
    flower = services("flower", [*DOCQ, "flower", "--port", str(port)], env)
    base = f"http://127.0.0.1:{port}"
    flower.wait_for(r"Visit me at", timeout_s=30)
    assert fetch(f"{base}/healthcheck")[0] == 200
    time.sleep(1)  # Flower's event receiver starts just after its HTTP server

    # Then anonymous and wrong-password requests are refused, pages and API alike
    for path in ("/", "/tasks", "/api/tasks", "/api/workers", "/broker"):
        assert fetch(base + path)[0] == 401, path
        assert fetch(base + path, ("ops", "wrong"))[0] == 401, path
    # and the password is on no command line
    assert password not in " ".join(subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout.splitlines())

    # When a job whose document holds the marker is queued (no worker yet: messages wait)
    docs = [("lighthouse", f"A note. {marker} Then the fog lifted over the harbour. " * 4),
            ("quay", "Boats and nets on the quay at noon. " * 8)]
    handle = submit(docs, "summarize")
    queued, bodies_queued = redis_dump(redis_client)
    # and workers run it while `watch` draws its progress as plain lines
    worker = workers(env)
    shown = io.StringIO()
    final = watch(handle.id, interval_s=0.3, out=shown)
    assert final["status"] == "succeeded", final
    after, _ = redis_dump(redis_client)
    status_cli = docq(env, "status", str(handle.id), "--json")

    # Then Flower lists the job's tasks by their argsrepr
    auth = ("ops", password)
    deadline, listed = time.monotonic() + 20, {}
    while time.monotonic() < deadline:
        code, body = fetch(f"{base}/api/tasks", auth)
        listed = json.loads(body) if code == 200 else {}
        if sum(t.get("state") == "SUCCESS" for t in listed.values()) >= final["batches_total"] + 1:
            break
        time.sleep(0.5)
    assert any(t["args"].startswith(f"job={handle.id} batch=") for t in listed.values()), listed
    pages = [body for uid in listed for _, body in [fetch(f"{base}/task/{uid}", auth)]]
    assert all(f"job={handle.id}" in page for page in pages)
    table = fetch(f"{base}/tasks/datatable?draw=1&start=0&length=100&search[value]="
                  "&order[0][column]=0&order[0][dir]=asc&columns[0][data]=name", auth)
    assert table[0] == 200 and f"job={handle.id}" in table[1]
    # and /metrics answers in Prometheus text without credentials
    code, metrics = fetch(f"{base}/metrics")
    assert code == 200 and "# TYPE flower_events_total counter" in metrics
    assert 'flower_events_total{task="batches.process"' in metrics or "batches." in metrics

    # and neither the key nor the marker is anywhere but the store
    places = {
        "redis while queued": queued.decode("utf-8", "replace"),
        "redis after": after.decode("utf-8", "replace"),
        "flower /api/tasks": json.dumps(listed), "flower task pages": "\n".join(pages),
        "flower tasks table": table[1], "flower metrics": metrics,
        "flower log": flower.log(), "worker log": worker.log(),
        "docq status": status_cli.stdout + status_cli.stderr, "watch": shown.getvalue(),
    }
    for place, content in places.items():
        assert key not in content, place
        assert marker not in content, place
        assert key.removeprefix("sk-planted-") not in content, place
    assert bodies_queued >= 1  # the message bodies were decoded and searched
    with runtime().sessions() as s:  # the store holds the text by design
        stored = s.scalar(text("select count(*) from chunks where text like :m"),
                          {"m": f"%{marker}%"})
    assert stored and stored > 0
    # and the progress ended with a line for the finished job
    assert shown.getvalue().splitlines()[-1].startswith(
        f"job {handle.id} succeeded: {final['chunks_total']}/{final['chunks_total']} chunks (100%)")


def test_flower_refuses_to_start_without_credentials(docq_env: Any) -> None:
    # Given no Flower credentials
    env = docq_env("http://127.0.0.1:9/v1")
    # When Flower starts on every interface, or with --insecure-local on every interface
    plain = docq(env, "flower", "--address", "0.0.0.0")
    insecure = docq(env, "flower", "--address", "0.0.0.0", "--insecure-local")
    # Then both stop at once with a message, no traceback
    assert plain.returncode == insecure.returncode == 2
    assert "set DOCQ_FLOWER_USER and DOCQ_FLOWER_PASSWORD" in plain.stderr
    assert "needs a loopback --address" in insecure.stderr
    assert "Traceback" not in plain.stderr + insecure.stderr


def test_progress_rates_come_from_the_last_minute() -> None:
    # Given statuses a job reported over two minutes
    rates = Rates()
    def status(done: int, tokens: int) -> dict[str, Any]:
        return {"id": 1, "status": "running", "chunks_done": done, "chunks_total": 100,
                "tokens_in": tokens, "tokens_out": 0, "chunks_by_state": {"error": 2},
                "cost": 0.5}
    rates.add(status(0, 0), now=0.0)
    rates.add(status(10, 1000), now=60.0)
    # When the pace doubles in the second minute
    snap = rates.add(status(30, 3000), now=120.0)
    # Then the rates are the last minute's, and the time left follows that pace
    assert snap.tokens_per_min == pytest.approx(2000)
    assert snap.left_s == pytest.approx(70 / (20 / 60))
    assert snap.line() == ("job 1 running: 30/100 chunks (30%), 2 errors, 2,000 tokens/min, "
                           "$0.5000, about 3m30s left")


# -- docker compose (no Docker engine here: the file's structure is checked) ---------------------


def test_the_compose_file_wires_the_whole_stack() -> None:
    # Given docker-compose.yml and .env.example
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    documented = (ROOT / ".env.example").read_text()
    services = compose["services"]
    # Then every service is there, Redis is durable and never evicts queued work
    assert set(services) == {"redis", "postgres", "migrate", "worker", "beat", "flower", "llm",
                             "prometheus", "grafana"}
    redis_cmd = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in redis_cmd
    assert services["postgres"]["volumes"] and services["postgres"]["healthcheck"]
    # and the docq services run the right commands against the same stores, after the migration
    commands = {name: services[name]["command"] for name in ("migrate", "worker", "beat")}
    assert commands == {"migrate": ["db", "upgrade"], "worker": ["worker"], "beat": ["beat"]}
    assert services["flower"]["command"][:3] == ["flower", "--address", "0.0.0.0"]
    for name in ("migrate", "worker", "beat", "flower"):
        env = services[name]["environment"]
        assert {"DOCQ_DATABASE_URL", "DOCQ_BROKER_URL", "DOCQ_LLM_BASE_URL", "DOCQ_CONFIG"} <= set(
            env), name
        assert "@postgres:5432/" in env["DOCQ_DATABASE_URL"] and "redis:6379" in env[
            "DOCQ_BROKER_URL"]
    for name in ("worker", "beat", "flower"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully")
    # and workers scale (no fixed name or port), Flower's credentials are required
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    flower_env = services["flower"]["environment"]
    assert ":?" in flower_env["DOCQ_FLOWER_USER"] and ":?" in flower_env["DOCQ_FLOWER_PASSWORD"]
    # and the model server is the `local` profile, optional for workers
    assert services["llm"]["profiles"] == ["local"]
    assert services["worker"]["depends_on"]["llm"]["required"] is False
    # and Prometheus and Grafana are the `monitoring` profile, scraping what workers and beat serve
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    scraped = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    ports = {job["job_name"]: job for job in scraped["scrape_configs"]}
    assert ports["docq-worker"]["dns_sd_configs"][0]["port"] == int(
        services["worker"]["environment"]["DOCQ_METRICS_PORT"])
    assert ports["docq-beat"]["static_configs"][0]["targets"] == [
        f"beat:{services['beat']['environment']['DOCQ_BEAT_METRICS_PORT']}"]
    # and every variable the file reads is documented, every named volume declared
    text = (ROOT / "docker-compose.yml").read_text()
    for var in set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", text)):
        assert var in documented, var
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in compose["volumes"], source


def test_flower_pages_show_short_fields_and_no_traceback() -> None:
    # Given a task event record with a long argument, a multi-line exception and a traceback
    from celery.events.state import Task

    from docqueue.tasks.flower import format_task

    task = Task(uuid="u1", name="jobs.merge", args="x" * 500, kwargs="{}", result="ok",
                exception="OperationalError: boom\n[SQL: INSERT ...]\n[parameters: secret]",
                traceback="Traceback (most recent call last):\n  ...")
    # When Flower formats it for a page
    shown = format_task(task)
    # Then the argument is cut, the exception keeps its first line, the traceback is replaced
    assert len(shown.args) == 201 and shown.args.endswith("…")
    assert shown.exception == "OperationalError: boom"
    assert "Traceback" not in shown.traceback and "worker's log" in shown.traceback
    assert shown.kwargs == "{}" and shown.result == "ok"
