"""The built wheel works outside the repository, in a project of a user's own.

The wheel is built once, installed with `--no-deps` into a fresh venv, and the dependencies are
made visible to that venv by a `.pth` file naming this interpreter's site-packages directories.
Python adds a directory named in a `.pth` file to `sys.path` without reading the `.pth` files
inside it, so this checkout's editable install (a `__editable___docqueue_*` finder started by a
`.pth` file) stays out of the new venv: its `docqueue` can only be the wheel's, which the tests
check. Everything then runs with the new venv's `docq` and `python`, from a directory holding
the user's own `models.py`, `tasks.py` (a Celery app of their own) and `workers.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import PG_URL, require_server
from tests.plugins.simulator import SimulatorFactory

pytestmark = pytest.mark.integration  # it builds a wheel and a venv, and runs a worker

ROOT = Path(__file__).resolve().parents[2]
BUILD_S, RUN_S, JOB_S, READY_S = 600, 120, 240, 120

USER_FILES = {
    "models.py": '"""The user\'s own models: the name is theirs, not docqueue\'s."""\n'
                 'OWNER = "user models"\n',
    "tasks.py": 'from celery import Celery\n\n'
                'app = Celery("shop", broker="memory://")\n'
                'OWNER = "user tasks"\n\n\n'
                '@app.task(name="shop.add")\n'
                'def add(x: int, y: int) -> int:\n'
                '    return x + y\n',
    "workers.py": 'OWNER = "user workers"\n',
    "notes.txt": "The night train leaves at ten. It reaches the coast by morning, where the "
                 "ferry waits for the passengers who booked the crossing.\n",
    "report.md": "# Quarterly report\n\nSales rose in the north and fell in the south; the "
                 "board will decide on the new warehouse next month.\n",
}
DOCUMENTS = ["notes.txt", "report.md"]


def run(argv: list[str | Path], *, timeout: float = RUN_S, **kwargs: object
        ) -> subprocess.CompletedProcess[str]:
    """Run to the end; a failure shows the command's output."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT],
        timeout=BUILD_S)
    (found,) = out.glob("docqueue-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel alone installed; the dependencies are this interpreter's."""
    path = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", path])
    python = path / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", wheel], timeout=BUILD_S)
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ours = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if "site-packages" in p)}
    (Path(purelib.stdout.strip()) / "docqueue-test-deps.pth").write_text(
        "".join(f"{p}\n" for p in sorted(ours) if Path(p).is_dir()))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's directory: their own models, tasks and workers modules, and two documents."""
    for name, body in USER_FILES.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    return tmp_path


@pytest.fixture
def store_url() -> Iterator[str]:
    """An empty PostgreSQL schema: the wheel's `docq db upgrade` creates the tables."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_URL}?options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def clean_env(project: Path, **docq: str) -> dict[str, str]:
    """This process's environment without what points into the checkout, plus DOCQ_*."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("DOCQ_")}
    env["DOCQ_HOME"] = str(project / ".docq")
    env.update({f"DOCQ_{k.upper()}": v for k, v in docq.items()})
    return env


class Worker:
    """`docq worker -c 1` of the new venv, run in the user's directory; stopped at teardown."""

    def __init__(self, docq: Path, project: Path, env: dict[str, str]) -> None:
        self.log_path = project / "worker.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([str(docq), "worker", "-c", "1", "--name", "wheel"],
                                     cwd=project, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            log = self.log_path.read_text(errors="replace")
            if " ready." in log:
                return
            assert self.proc.poll() is None, f"the worker exited:\n{log[-3000:]}"
            time.sleep(0.3)
        raise AssertionError(f"the worker was not ready in {READY_S} s:\n{log[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def test_the_wheel_holds_one_import_name_and_its_package_data(wheel: Path) -> None:
    # Given the built wheel's file list
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    # Then its only top-level names are the package and its dist-info
    assert {n.split("/")[0] for n in names} == {"docqueue", "docqueue-0.1.0.dist-info"}
    # And the files read at run time are in it, where the code looks for them
    expected = {"docqueue/py.typed", "docqueue/models/migrations/script.py.mako"}
    expected |= {f"docqueue/workers/provider/lua/{p.name}"
                 for p in (ROOT / "workers/provider/lua").glob("*.lua")}
    expected |= {f"docqueue/workers/local/corpus/{p.name}"
                 for p in (ROOT / "workers/local/corpus").iterdir()}
    assert len(expected) > 8 and expected <= names, sorted(expected - names)


def test_the_installed_package_is_the_wheels_beside_the_users_own_modules(
    venv: Path, project: Path
) -> None:
    # Given the user's directory with modules named models, tasks and workers
    python = venv / "bin" / "python"
    probe = ("import json, docqueue, models, tasks, workers\n"
             "from docqueue import submit, JobHandle\n"
             "from docqueue.workers.local import DEMO_CORPUS\n"
             "print(json.dumps({'docqueue': docqueue.__file__,\n"
             "  'tasks': docqueue.tasks.__file__, 'mine': [models.OWNER, tasks.OWNER,\n"
             "  workers.OWNER], 'app': tasks.app.main, 'add': tasks.add.name,\n"
             "  'corpus': str(DEMO_CORPUS),\n"
             "  'texts': sorted(p.name for p in DEMO_CORPUS.iterdir())}))\n")
    # When Python runs there, with the new venv
    found = json.loads(run([python, "-c", probe], cwd=project,
                           env=clean_env(project)).stdout)
    # Then `import models, tasks, workers` gives the user's, and docqueue is the wheel's
    assert found["mine"] == ["user models", "user tasks", "user workers"]
    assert (found["app"], found["add"]) == ("shop", "shop.add")
    for key in ("docqueue", "tasks", "corpus"):
        assert Path(found[key]).is_relative_to(venv), (key, found[key])
    # And the demo corpus resolves inside the installed package, with the repository's texts
    assert found["texts"] == sorted(p.name for p in (ROOT / "workers/local/corpus").iterdir())


def test_a_job_runs_from_the_users_directory_with_the_installed_docq(
    venv: Path, project: Path, store_url: str, redis_url: str, simulator: SimulatorFactory
) -> None:
    # Given the new venv's `docq`, an empty store and the provider simulator
    docq = venv / "bin" / "docq"
    sim = simulator("--seed", "7")
    env = clean_env(project, database_url=store_url, broker_url=redis_url, llm_base_url=sim.url,
                    llm_model="docq-sim", llm_mode="chat", retry_backoff_base_s="0.2")
    assert "submit" in run([docq, "--help"], cwd=project, env=env).stdout
    # When the store is created from the wheel's migrations and a worker started there
    assert "up to date" in run([docq, "db", "upgrade"], cwd=project, env=env).stdout
    worker = Worker(docq, project, env)
    try:
        worker.wait_ready()
        # And the user submits their two documents and waits
        done = run([docq, "submit", *DOCUMENTS, "--pipeline", "summarize", "--wait", "--json"],
                   cwd=project, env=env, timeout=JOB_S)
        report = json.loads(done.stdout)
        results = run([docq, "results", str(report["job_id"])], cwd=project, env=env)
    finally:
        worker.stop()
    # Then the job succeeded with both documents summarized
    assert report["documents_accepted"] == 2 and report["documents_rejected"] == 0
    assert report["final"]["status"] == "succeeded", report["final"]
    docs = [json.loads(line) for line in results.stdout.splitlines()]
    assert sorted(Path(d["id"]).name for d in docs) == sorted(DOCUMENTS)
    assert all(d["status"] == "ok" and d["output"]["summary"] for d in docs), docs
