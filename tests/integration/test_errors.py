"""Every failure a user meets in the CLI: one `error:` line, the documented exit status, no secret.

Each test runs `docq` as a subprocess against real services or against ports where nothing
listens, a PostgreSQL role that does not exist, a Redis this test starts with a password (and
kills), and the simulator with an API key. Exit statuses are those of tasks/cli/app.py, listed
in the README.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from sqlalchemy import create_engine, func, select, text

from docqueue.models import Job, make_sessionmaker
from docqueue.tasks.celery import DEFAULT_QUEUE, RESCUE_QUEUE
from docqueue.workers.local.embedded_redis import redis_server_binary
from tests.conftest import free_port, require_server

pytestmark = pytest.mark.integration

DOCQ = [sys.executable, "-c", "from docqueue.tasks.cli import main; main()"]
EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_SENT = 1, 2, 4, 5

PG_SECRET = "pg-s3cret-7731"
BROKER_SECRET = "rd-s3cret-4410"
API_KEY = "sk-test-s3cret-9902"
SECRETS = (PG_SECRET, BROKER_SECRET, API_KEY)


def with_password(url: str, password: str) -> str:
    """The PostgreSQL URL with a password: trust auth ignores it, but no output may show it."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)


def docq(env: dict[str, str], *args: str, cwd: Path, timeout_s: float = 120
         ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCQ_")}
    return subprocess.run([*DOCQ, *args], cwd=cwd, env={**base, **env}, text=True,
                          capture_output=True, timeout=timeout_s, check=False)


def assert_one_error(done: subprocess.CompletedProcess[str], status: int, *fragments: str) -> str:
    """One `error:` line on stderr naming the fragments; this exit status; no traceback or key."""
    out = done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == status, (done.returncode, out)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in out
    for secret in SECRETS:
        assert secret not in out, out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"d{i}.txt").write_text(f"Document {i} tells of the harbour at dawn.\n")
    return root


@pytest.fixture
def env(pg_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """A working configuration whose store URL and API key carry secrets."""
    return {
        "DOCQ_DATABASE_URL": with_password(pg_url, PG_SECRET),
        "DOCQ_BROKER_URL": redis_url,
        "DOCQ_LLM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "DOCQ_LLM_API_KEY": API_KEY,
        "DOCQ_LLM_MODEL": "docq-sim",
        "DOCQ_HOME": str(tmp_path / "home"),
    }


def jobs_in(url: str) -> int:
    sessions = make_sessionmaker(url)
    try:
        with sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Job)) or 0)
    finally:
        sessions.kw["bind"].dispose()


class OwnRedis:
    """A redis-server this test starts on a free port, optionally with a password, and kills."""

    def __init__(self, port: int, password: str | None = None) -> None:
        self.port, self.password = port, password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis() -> Iterator[Callable[..., OwnRedis]]:
    started: list[OwnRedis] = []

    def start(port: int | None = None, password: str | None = None) -> OwnRedis:
        server = OwnRedis(port or free_port(), password).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


# -- the results store ------------------------------------------------------------------------


def test_a_store_where_nothing_listens(tmp_path: Path, corpus: Path) -> None:
    # Given DOCQ_DATABASE_URL with a password, at a port where nothing listens
    url = f"postgresql://docq:{PG_SECRET}@127.0.0.1:{free_port()}/docq"
    env = {"DOCQ_DATABASE_URL": url, "DOCQ_HOME": str(tmp_path / "home")}
    # When status, results and submit are asked of it
    for args in (["status", "1"], ["results", "1"]):
        done = docq(env, *args, cwd=tmp_path)
        # Then one line names the store (password masked), the setting and the remedy
        assert_one_error(done, EXIT_UNAVAILABLE, "cannot reach the results store",
                         "docq:***@127.0.0.1", "(DOCQ_DATABASE_URL)", "Connection refused",
                         "start the database")


def test_a_store_that_refuses_the_credentials(tmp_path: Path) -> None:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    url = f"postgresql://no_such_role_20:{PG_SECRET}@127.0.0.1:5432/test"
    done = docq({"DOCQ_DATABASE_URL": url}, "status", "1", cwd=tmp_path)
    assert_one_error(done, EXIT_UNAVAILABLE, "refuses the credentials", "no_such_role_20:***@",
                     "check the user and password in DOCQ_DATABASE_URL")


@pytest.fixture
def unmigrated_pg(pg_database: str) -> Iterator[str]:
    """A PostgreSQL schema without docqueue's tables (in this test process's database)."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_database.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield with_password(f"{pg_database}?options={quote(f'-csearch_path={schema}')}", PG_SECRET)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_a_store_not_migrated(tmp_path: Path, unmigrated_pg: str) -> None:
    # Given a PostgreSQL schema and a SQLite file, neither migrated
    for url in (unmigrated_pg, f"sqlite:///{tmp_path}/empty.db"):
        # When a job is asked for / Then the line says to run `docq db upgrade`
        done = docq({"DOCQ_DATABASE_URL": url}, "status", "1", cwd=tmp_path)
        assert_one_error(done, EXIT_UNAVAILABLE, "is not set up for this version of docqueue",
                         "run `docq db upgrade`")


# -- the broker -------------------------------------------------------------------------------


def test_a_broker_where_nothing_listens_records_nothing(
    env: dict[str, str], corpus: Path, tmp_path: Path
) -> None:
    # Given a broker URL with a password, at a port where nothing listens
    env = {**env, "DOCQ_BROKER_URL": f"redis://:{BROKER_SECRET}@127.0.0.1:{free_port()}/0"}
    # When a corpus is submitted
    done = docq(env, "submit", str(corpus), cwd=tmp_path)
    # Then one line names the broker, masked, and says nothing was recorded; no job exists
    assert_one_error(done, EXIT_UNAVAILABLE, "cannot reach the broker", ":***@127.0.0.1",
                     "(DOCQ_BROKER_URL)", "nothing was recorded")
    assert jobs_in(env["DOCQ_DATABASE_URL"]) == 0


@pytest.mark.parametrize(
    ("broker", "says"),
    [
        (f"amqp://guest:{BROKER_SECRET}@127.0.0.1:5672/{{vhost}}",
         ("refuses the credentials", "check the user and password in DOCQ_BROKER_URL")),
        ("amqp://guest:guest@127.0.0.1:{port}/{vhost}",
         ("cannot reach the broker", "start RabbitMQ there")),
    ],
    ids=["wrong-password", "nothing-listens"],
)
def test_a_rabbitmq_broker_that_cannot_be_used_records_nothing(
    env: dict[str, str], corpus: Path, tmp_path: Path, rabbitmq_url: str, broker: str,
    says: tuple[str, ...],
) -> None:
    # Given a RabbitMQ broker with a wrong password, or where nothing listens, and a good Redis
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    env = {**env, "DOCQ_REDIS_URL": env["DOCQ_BROKER_URL"],
           "DOCQ_BROKER_URL": broker.format(vhost=vhost, port=free_port())}
    # When a corpus is submitted
    done = docq(env, "submit", str(corpus), cwd=tmp_path)
    # Then one line names the broker and what to do, the password masked; no job exists
    assert_one_error(done, EXIT_UNAVAILABLE, *says, "(DOCQ_BROKER_URL)", "nothing was recorded")
    assert jobs_in(env["DOCQ_DATABASE_URL"]) == 0
    # and `docq check` says the same of the broker, and that the Redis is fine, one line each
    done = docq(env, "check", cwd=tmp_path)
    assert f"docqueue's Redis {env['DOCQ_REDIS_URL']} (DOCQ_REDIS_URL): ok" in done.stdout
    broker_lines = [line for line in done.stderr.splitlines() if "DOCQ_BROKER_URL" in line]
    assert len(broker_lines) == 1 and says[0] in broker_lines[0], done.stderr
    assert BROKER_SECRET not in done.stdout + done.stderr


def test_a_broker_that_refuses_the_credentials(
    env: dict[str, str], corpus: Path, tmp_path: Path, own_redis: Callable[..., OwnRedis]
) -> None:
    # Given a Redis that wants a password, and DOCQ_BROKER_URL with a wrong one
    server = own_redis(password="the-right-one-52")
    env = {**env, "DOCQ_BROKER_URL": f"redis://:{BROKER_SECRET}@127.0.0.1:{server.port}/0"}
    # When a corpus is submitted and a job resumed
    for args in (["submit", str(corpus)], ["resume"]):
        done = docq(env, *args, cwd=tmp_path)
        # Then the line says the broker refuses the credentials
        assert_one_error(done, EXIT_UNAVAILABLE, "refuses the credentials",
                         "check the password in DOCQ_BROKER_URL")


def test_a_broker_lost_between_ingest_and_publish(
    env: dict[str, str], tmp_path: Path, own_redis: Callable[..., OwnRedis]
) -> None:
    # Given a Redis this test started, and a corpus that takes a few seconds to ingest
    server = own_redis()
    env = {**env, "DOCQ_BROKER_URL": server.url}
    lines = "".join(json.dumps({"id": f"doc-{i}", "text": f"Record {i}. " + "Words of the "
                               "harbour, the boats and the tide. " * 30}) + "\n"
                    for i in range(6_000))
    corpus = tmp_path / "big.jsonl.gz"
    corpus.write_bytes(gzip.compress(lines.encode()))
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOCQ_")}
    submit = subprocess.Popen([*DOCQ, "submit", str(corpus)], cwd=tmp_path, env={**base, **env},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # When the broker dies once the job is recorded and its documents are being ingested
    sessions = make_sessionmaker(env["DOCQ_DATABASE_URL"])
    deadline = time.monotonic() + 60
    while True:
        with sessions() as session:
            if session.scalar(select(func.count()).select_from(Job)):
                break
        assert submit.poll() is None, submit.communicate()
        assert time.monotonic() < deadline, "the job never appeared"
        time.sleep(0.05)
    server.kill()
    stdout, stderr = submit.communicate(timeout=180)
    done = subprocess.CompletedProcess(submit.args, submit.returncode, stdout, stderr)
    # Then one line says the job is recorded, none of its batches sent, and what sends them
    line = assert_one_error(done, EXIT_NOT_SENT, "none of its batches was sent",
                            "cannot reach the broker", "Nothing is lost", "`docq resume 1`",
                            "docq beat")
    assert "job 1 is recorded (6,000 documents" in line
    with sessions() as session:
        job = session.get(Job, 1)
        assert job is not None and job.status == "running" and job.batches_total > 0
        batches = job.batches_total
    sessions.kw["bind"].dispose()
    # And once the broker is back, `docq resume 1` sends every batch
    back = own_redis(port=server.port)
    resumed = docq(env, "resume", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"sent {batches} batches again" in resumed.stdout
    # (batches sent again go to the rescue queue, ahead of any new job's)
    client = redis.Redis.from_url(back.url)
    assert client.llen(RESCUE_QUEUE) == batches
    assert client.llen(DEFAULT_QUEUE) == 0
    client.close()


# -- the model endpoint -----------------------------------------------------------------------


def test_a_model_endpoint_where_nothing_listens(env: dict[str, str], tmp_path: Path) -> None:
    # When the settings are checked against an endpoint where nothing listens
    done = docq(env, "check", cwd=tmp_path)
    # Then the store and the broker are fine, and one line names the endpoint
    assert "the results store" in done.stdout and "ok" in done.stdout
    assert_one_error(done, EXIT_UNAVAILABLE, "cannot reach the model endpoint",
                     "(DOCQ_LLM_BASE_URL)", "connection refused")


def test_a_model_endpoint_that_refuses_the_key(
    env: dict[str, str], tmp_path: Path, simulator: Callable[..., object]
) -> None:
    sim = simulator("--api-key", "the-key-it-wants")
    env = {**env, "DOCQ_LLM_BASE_URL": sim.url}  # type: ignore[attr-defined]
    done = docq(env, "check", cwd=tmp_path)
    assert_one_error(done, EXIT_UNAVAILABLE, "refuses the API key (HTTP 401)",
                     "DOCQ_LLM_API_KEY")
    # And with the right key the endpoint is fine and serves the model
    ok = docq({**env, "DOCQ_LLM_API_KEY": "the-key-it-wants"}, "check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "serving docq-sim" in ok.stdout


# -- jobs, config, options ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [["status", "424242"], ["results", "424242"],
                                  ["cancel", "424242"], ["retry", "424242"],
                                  ["resume", "424242"]])
def test_an_unknown_job(env: dict[str, str], tmp_path: Path, args: list[str]) -> None:
    done = docq(env, *args, cwd=tmp_path)
    assert_one_error(done, EXIT_USAGE, "job 424242 does not exist")


def test_a_job_of_another_pipeline(env: dict[str, str], corpus: Path, tmp_path: Path) -> None:
    # Given a summarize job
    submitted = docq(env, "submit", str(corpus), "--json", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job_id"]
    # When its OpenAI Batch result files are asked for / Then the line says why not
    done = docq(env, "results", str(job), "--format", "openai-batch", "--output",
                str(tmp_path / "out"), cwd=tmp_path)
    assert_one_error(done, EXIT_USAGE, f"job {job} ran the 'summarize' pipeline",
                     "--pipeline openai-batch")


def test_an_unreadable_config(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "docq.toml"
    bad.write_text("[[schedule]\nname = 'x'\n")
    for path, fragment in ((bad, "is not valid TOML"), (tmp_path, "cannot read the schedule file"),
                           (tmp_path / "missing" / "docq.toml", None)):
        done = docq({**env, "DOCQ_CONFIG": str(path)}, "schedules", cwd=tmp_path)
        if fragment is None:  # no file is no schedule: said on stdout, not an error
            assert done.returncode == 0 and "no schedule file" in done.stdout
        else:
            assert_one_error(done, EXIT_USAGE, fragment, str(path))


@pytest.mark.parametrize(
    ("args", "setting", "fragments"),
    [
        (["status", "abc"], {}, ["invalid value for 'job'", "docq status --help"]),
        (["submit", "CORPUS", "--cache", "bogus"], {}, ["unknown cache policy 'bogus'"]),
        (["submit", "CORPUS", "--pipeline", "nope"], {}, ["nope"]),
        (["submit", "CORPUS", "--budget-tokens", "-5"], {}, ["--budget-tokens", "above 0"]),
        (["results", "1", "--format", "xml"], {}, ["unknown format 'xml'"]),
        (["worker", "--pool", "nope"], {}, ["choose prefork or threads"]),
        (["status", "1", "--colour"], {}, ["no such option: --colour"]),
        (["status", "1"], {"DOCQ_LLM_TIMEOUT_S": "soon"}, ["DOCQ_LLM_TIMEOUT_S='soon'"]),
        (["status", "1"], {"DOCQ_LLM_TIMEOUT_S": "900"}, ["must be below"]),
    ],
)
def test_bad_option_and_setting_values(
    env: dict[str, str], corpus: Path, tmp_path: Path, args: list[str],
    setting: dict[str, str], fragments: list[str],
) -> None:
    args = [str(corpus) if a == "CORPUS" else a for a in args]
    done = docq({**env, **setting}, *args, cwd=tmp_path)
    assert_one_error(done, EXIT_USAGE, *fragments)


def test_a_submit_that_accepts_nothing_records_no_job(env: dict[str, str], tmp_path: Path) -> None:
    # When a path that does not exist is submitted
    done = docq(env, "submit", "/nonexistent", cwd=tmp_path)
    # Then the line says nothing was submitted and why, the exit is non-zero, and no job exists
    assert_one_error(done, EXIT_USAGE, "nothing to submit", "no job was recorded",
                     "/nonexistent does not exist")
    assert jobs_in(env["DOCQ_DATABASE_URL"]) == 0


def test_debug_shows_the_traceback_without_secrets(tmp_path: Path) -> None:
    url = f"postgresql://docq:{PG_SECRET}@127.0.0.1:{free_port()}/docq"
    for how in (["--debug"], []):
        extra = {} if how else {"DOCQ_DEBUG": "1"}
        done = docq({"DOCQ_DATABASE_URL": url, **extra}, *how, "status", "1", cwd=tmp_path)
        assert done.returncode == EXIT_UNAVAILABLE
        assert "Traceback" in done.stderr and PG_SECRET not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("error: cannot reach")


def test_a_failed_job_ends_with_its_summary_in_words(
    env: dict[str, str], corpus: Path, tmp_path: Path, simulator: Callable[..., object],
    workers: Callable[..., object], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an endpoint that refuses the configured key, and a worker
    sim = simulator("--api-key", "the-key-it-wants")
    env = {**env, "DOCQ_LLM_BASE_URL": sim.url}  # type: ignore[attr-defined]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    workers(env)
    # When a corpus is submitted and waited for
    done = docq(env, "submit", str(corpus), "--wait", cwd=tmp_path, timeout_s=240)
    # Then the job fails with its chunks counted in words, and the key never shows
    assert done.returncode == EXIT_JOB_FAILED, done.stdout + done.stderr
    assert "job 1 failed: 3 failed;" in done.stdout
    assert "{" not in done.stdout.splitlines()[-2] + done.stdout.splitlines()[-1]
    assert API_KEY not in done.stdout + done.stderr
