"""The Prometheus metrics a worker process records: one definition each, and the two calls the
hot path makes (a model call ended, cache hits were used).

Only events are recorded here; state (the limiter's use against its limits, queue depth, the
progress of running jobs, memory) is read when Prometheus scrapes, by the collector in
tasks/exporter.py. The model-call metrics carry OpenTelemetry's GenAI names where they exist
(`gen_ai.client.operation.duration`, `gen_ai.client.token.usage`, with their attribute names
as labels); docqueue's own are `docq_*`. No label holds document text, a key or an id: the
values are an endpoint's host, a model, a pipeline, an outcome.

Workers write these from many processes: tasks/exporter.py switches prometheus_client to its
multiprocess files before any pool process starts, and every metric here has labels, so no
value exists before that switch.
"""

from __future__ import annotations

from contextvars import ContextVar
from urllib.parse import urlsplit

from prometheus_client import Counter, Histogram

from docqueue.workers.errors import (
    EndpointUnreachableError,
    LLMErrorMixin,
    PermanentError,
    RateLimitedError,
)

# The pipeline of the batch a coroutine works for: set once per pass over a batch, read by the
# metered model client (workers/batch/metering.py), which does not otherwise know it.
current_pipeline: ContextVar[str] = ContextVar("docq_pipeline", default="")

# Bucket boundaries as the GenAI conventions specify them.
DURATION_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                      40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
                "server_address", "pipeline")

OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of one model call, whatever its outcome (error_type is empty on success).",
    [*GENAI_LABELS, "error_type"], buckets=DURATION_BUCKETS_S)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens of one successful model call, by gen_ai_token_type (input or output); _sum is the "
    "total.", [*GENAI_LABELS, "gen_ai_token_type"], buckets=TOKEN_BUCKETS)
CALLS = Counter(
    "docq_model_calls", "Model calls by outcome: ok, 429, 5xx, timeout, permanent, error "
    "(another retryable failure) or unreachable (no connection: not an attempt).",
    ["endpoint", "model", "pipeline", "outcome"])
COST = Counter("docq_model_cost_usd", "What the model calls cost, at the configured prices.",
               ["endpoint", "model", "pipeline"])
CACHE_HITS = Counter("docq_response_cache_hits", "Chunks answered from the response cache.",
                     ["model", "pipeline"])


def endpoint_label(base_url: str) -> str:
    """An endpoint as a label: its host and port only (no user, password, path or query)."""
    parts = urlsplit(base_url)
    host = parts.hostname or base_url
    return f"{host}:{parts.port}" if parts.port else host


def outcome_of(exc: BaseException | None) -> str:
    """The `outcome` label of a call that ended with `exc` (None: it returned)."""
    if exc is None:
        return "ok"
    if isinstance(exc, RateLimitedError):
        return "429"
    if isinstance(exc, EndpointUnreachableError):
        return "unreachable"
    status = exc.http_status if isinstance(exc, LLMErrorMixin) else None
    if status is not None and status >= 500:
        return "5xx"
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, LLMErrorMixin) and exc.code == "timeout":
        return "timeout"
    return "error"


def model_call(*, endpoint: str, model: str, operation: str, seconds: float,
               exc: BaseException | None, tokens_in: int = 0, tokens_out: int = 0,
               cost: float | None = None) -> None:
    """Record one model call: its outcome, duration and, when it returned, usage and cost."""
    pipeline = current_pipeline.get()
    genai = (operation, "openai", model, endpoint, pipeline)
    outcome = outcome_of(exc)
    CALLS.labels(endpoint, model, pipeline, outcome).inc()
    error_type = "" if exc is None else type(exc).__name__
    OPERATION_DURATION.labels(*genai, error_type).observe(seconds)
    if exc is not None:
        return
    TOKEN_USAGE.labels(*genai, "input").observe(tokens_in)
    TOKEN_USAGE.labels(*genai, "output").observe(tokens_out)
    if cost is not None:
        COST.labels(endpoint, model, pipeline).inc(cost)


def cache_hits(model: str, pipeline: str, n: int) -> None:
    """Record `n` chunks answered from the response cache (0 too: a counter that exists before
    its first hit lets `rate()` see that hit)."""
    CACHE_HITS.labels(model, pipeline).inc(n)
