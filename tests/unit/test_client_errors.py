"""The model client names what went wrong on the way to the endpoint, against real sockets.

Each case puts a real socket on loopback in the way (nothing listening, a server that cuts the
response, one that never answers) and checks the error class the batch processor acts on and
the sentence the user reads. Only the DNS case replaces the OS resolver, which would otherwise
ask a name server off this machine.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from docqueue.workers.errors import EndpointUnreachableError, RetryableLLMError
from docqueue.workers.pipelines import Prompt
from docqueue.workers.provider.client import LLM, EndpointConfig, OpenAICompatibleLLM
from docqueue.workers.provider.lean import LeanLLM

Client = Callable[[EndpointConfig], LLM]


@pytest.fixture(params=[OpenAICompatibleLLM, LeanLLM], ids=["langchain", "lean"])
def client(request: pytest.FixtureRequest) -> Client:
    """Both model clients (DOCQ_LLM_CLIENT): each must name every failure the same way."""
    return request.param  # type: ignore[no-any-return]


def _complete(client: Client, base_url: str, timeout_s: float = 5.0) -> BaseException:
    return _timed_complete(client, base_url, timeout_s)[0]


def _timed_complete(client: Client, base_url: str,
                    timeout_s: float) -> tuple[BaseException, float]:
    """The error one call raised, and how long the call took (the client's build not counted:
    on a loaded machine building it takes longer than the timeouts under test)."""

    async def call() -> tuple[BaseException, float]:
        llm = client(EndpointConfig(
            base_url=base_url, model="m", mode="completion", api_key="sk-test-secret-123",
            timeout_s=timeout_s, temperature=0.0, max_connections=2))
        started = time.monotonic()
        try:
            await llm.complete(Prompt(text="hello"), max_tokens=5)
        except BaseException as exc:
            return exc, time.monotonic() - started
        finally:
            await llm.aclose()
        raise AssertionError("the call succeeded")

    return asyncio.run(call())


@contextmanager
def _server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-connection-at-a-time TCP server on loopback; yields its base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _read_request(conn: socket.socket) -> None:
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk


def test_a_refused_connection_is_named_as_such_and_is_not_an_attempt(client: Client) -> None:
    # Given a port where nothing listens
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    url = f"http://127.0.0.1:{port}/v1"
    # When a call is made there
    exc, took = _timed_complete(client, url, timeout_s=60)
    # Then it fails at once, as "unreachable", and says "connection refused", not "timeout"
    assert took < 5
    assert isinstance(exc, EndpointUnreachableError)
    assert str(exc) == f"could not connect to {url} (connection refused)"
    assert exc.code == "connection_refused"


def test_a_response_cut_mid_body_is_a_reset_and_counts_as_an_attempt(client: Client) -> None:
    def cut(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{\"id\": \"cmpl-1\", \"choi")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    with _server(cut) as url:
        exc = _complete(client, url)
    assert type(exc) is RetryableLLMError
    assert exc.code == "connection_reset"
    assert str(exc) == f"the connection to {url} was closed before the response was complete"


def test_a_server_that_never_answers_times_out_naming_the_limit(client: Client) -> None:
    def silent(conn: socket.socket) -> None:
        _read_request(conn)
        time.sleep(6.0)

    with _server(silent) as url:
        exc, took = _timed_complete(client, url, timeout_s=0.5)
    assert type(exc) is RetryableLLMError
    assert exc.code == "timeout"
    assert str(exc) == f"the model at {url} did not answer within 0.5 s (DOCQ_LLM_TIMEOUT_S)"
    assert 0.4 < took < 5.0  # the client's limit, not the server hanging up after 6 s


def test_an_unknown_host_is_named_and_is_not_an_attempt(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a resolver that knows no such host (the real one would ask a name server)
    def no_such_host(host: str, *args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    url = "http://llm.example.invalid:8000/v1"
    exc = _complete(client, url)
    assert isinstance(exc, EndpointUnreachableError)
    assert exc.code == "dns_failure"
    assert str(exc) == (f"could not connect to {url} (cannot resolve host llm.example.invalid: "
                        "Name or service not known)")


def test_no_transport_error_carries_the_api_key(client: Client) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    exc = _complete(client, f"http://127.0.0.1:{port}/v1")
    assert "sk-test-secret-123" not in str(exc)
    assert "sk-test-secret-123" not in repr(exc)
