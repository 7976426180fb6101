"""Asking a model endpoint, before any work, whether it answers, takes the key and serves the model.

`probe_endpoint` sends one `GET {base}/models`, which every OpenAI-compatible server answers
(OpenAI, vLLM, llama.cpp's server, Ollama, the simulator) and which costs no tokens. Its errors
are one sentence each, naming the URL (password masked) and the setting to change; the API key
never appears in them, not even where the server's body quotes it (the body is not shown).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

from docqueue.workers.errors import EndpointCheckError
from docqueue.workers.settings import masked_url

MAX_MODELS_SHOWN = 5


@dataclass(frozen=True)
class ProbeResult:
    """What the endpoint said: the models it serves (empty when it lists none)."""

    models: tuple[str, ...]


def probe_endpoint(
    base_url: str, *, api_key: str | None, model: str, timeout_s: float
) -> ProbeResult:
    """Check that the endpoint at `base_url` answers, accepts `api_key` and serves `model`.

    Raises:
        EndpointCheckError: unreachable, refusing the key, not an OpenAI-compatible API, or
            listing models without `model`.
    """
    where = f"the model endpoint {masked_url(base_url)} (DOCQ_LLM_BASE_URL)"
    request = urllib.request.Request(base_url.rstrip("/") + "/models", method="GET")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        raise _http_error(where, exc.code) from None
    except urllib.error.URLError as exc:
        raise EndpointCheckError(
            f"cannot reach {where}: {_reason(exc.reason)}; start the server or point "
            "DOCQ_LLM_BASE_URL at a running one") from None
    except TimeoutError:
        raise EndpointCheckError(
            f"{where} did not answer within {timeout_s:g} s (DOCQ_LLM_TIMEOUT_S)") from None
    except (OSError, ValueError) as exc:
        raise EndpointCheckError(f"cannot reach {where}: {_reason(exc)}") from None
    served = _model_ids(body)
    if served and model not in served:
        shown = ", ".join(served[:MAX_MODELS_SHOWN]) + (", ..." if len(served) > 5 else "")
        raise EndpointCheckError(
            f"{where} does not serve the model {model!r} (DOCQ_LLM_MODEL); it serves: {shown}")
    return ProbeResult(tuple(served))


def _http_error(where: str, status: int) -> EndpointCheckError:
    if status in (401, 403):
        return EndpointCheckError(
            f"{where} refuses the API key (HTTP {status}): set DOCQ_LLM_API_KEY to a key this "
            "endpoint accepts")
    if status == 404:
        return EndpointCheckError(
            f"{where} has no /models (HTTP 404): DOCQ_LLM_BASE_URL must be the API's base, "
            "which usually ends in /v1")
    return EndpointCheckError(f"{where} answered GET /models with HTTP {status}")


def _model_ids(body: bytes) -> list[str]:
    """The model ids of an OpenAI `/models` answer; empty if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return []
    return [str(e["id"]) for e in entries if isinstance(e, dict) and "id" in e]


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__
