"""One settings object for docqueue, read from DOCQ_* variables and an optional .env file.

`Settings()` is constructed in `tasks/runtime.py` and in tests only; everything below receives
the object (or the part it needs) as an argument.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

LLMMode = Literal["chat", "completion"]


class Price(BaseModel):
    """Dollars per million tokens: input, cached input and output; the batch entries default
    to half."""

    input_per_mtok: float
    output_per_mtok: float
    # Prompt tokens the provider read from its prompt cache; None: billed as any input token.
    cached_input_per_mtok: float | None = None
    # The provider's Batch API and the flex service tier (OpenAI prices both at half).
    batch_input_per_mtok: float | None = None
    batch_output_per_mtok: float | None = None

    def rates(self, lane: str = "online", tier: str | None = None) -> tuple[float, float]:
        """(input, output) dollars per million tokens for a lane and an online service tier."""
        if _half_price(lane, tier):
            return (
                self.input_per_mtok / 2 if self.batch_input_per_mtok is None
                else self.batch_input_per_mtok,
                self.output_per_mtok / 2 if self.batch_output_per_mtok is None
                else self.batch_output_per_mtok,
            )
        return self.input_per_mtok, self.output_per_mtok

    def cached_rate(self, lane: str = "online", tier: str | None = None) -> float:
        """Dollars per million cached prompt tokens: the cached price (halved where the batch
        price applies), else the input rate."""
        if self.cached_input_per_mtok is None:
            return self.rates(lane, tier)[0]
        return self.cached_input_per_mtok / (2 if _half_price(lane, tier) else 1)

    def cost(self, tokens_in: int, tokens_out: int, lane: str = "online",
             tier: str | None = None, cached: int = 0) -> float:
        """What a call's usage costs: `cached` of its `tokens_in` at the cached rate, the rest
        of them at the input rate."""
        rate_in, rate_out = self.rates(lane, tier)
        cached = min(max(cached, 0), tokens_in)
        return ((tokens_in - cached) * rate_in + cached * self.cached_rate(lane, tier)
                + tokens_out * rate_out) / 1e6

    def saved(self, cached: int, lane: str = "online", tier: str | None = None) -> float:
        """What `cached` prompt tokens cost less than at the input rate."""
        return cached * (self.rates(lane, tier)[0] - self.cached_rate(lane, tier)) / 1e6


def _half_price(lane: str, tier: str | None) -> bool:
    return lane == "batch" or tier == "flex"


# Published list prices per million tokens (cached input: the rate of prompt tokens read from
# the provider's prompt cache); override or extend with DOCQ_PRICES (JSON).
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(input_per_mtok=0.15, cached_input_per_mtok=0.075, output_per_mtok=0.60),
    "gpt-4o": Price(input_per_mtok=2.50, cached_input_per_mtok=1.25, output_per_mtok=10.00),
    "gpt-4.1-mini": Price(input_per_mtok=0.40, cached_input_per_mtok=0.10, output_per_mtok=1.60),
    "gpt-4.1-nano": Price(input_per_mtok=0.10, cached_input_per_mtok=0.025,
                          output_per_mtok=0.40),
    "gpt-4.1": Price(input_per_mtok=2.00, cached_input_per_mtok=0.50, output_per_mtok=8.00),
    "gpt-5": Price(input_per_mtok=1.25, cached_input_per_mtok=0.125, output_per_mtok=10.00),
    "gpt-5-mini": Price(input_per_mtok=0.25, cached_input_per_mtok=0.025, output_per_mtok=2.00),
    "gpt-5-nano": Price(input_per_mtok=0.05, cached_input_per_mtok=0.005, output_per_mtok=0.40),
    # The simulator and the local model cost nothing; a known zero is still a price.
    "docq-sim": Price(input_per_mtok=0.0, output_per_mtok=0.0),
    "gemma-3-270m": Price(input_per_mtok=0.0, output_per_mtok=0.0),
}

LOCAL_MODEL_NAME = "gemma-3-270m"

# Context windows in tokens (prompt and output together); DOCQ_LLM_CONTEXT_TOKENS overrides.
# The local model's is the n_ctx its server is started with (workers/local/model.py); the
# simulator answers any length unless started with --context-limit, and stands in for
# gpt-4o-mini here.
KNOWN_CONTEXT_TOKENS: dict[str, int] = {
    "gpt-4o-mini": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "gpt-4.1": 1_047_576,
    "docq-sim": 128_000,
    LOCAL_MODEL_NAME: 2048,
}
# A model not listed above is taken to hold this much, until DOCQ_LLM_CONTEXT_TOKENS says.
UNKNOWN_CONTEXT_TOKENS = 4096


OPENAI_HOST = "api.openai.com"


@functools.lru_cache(maxsize=64)
def _takes_prompt_cache_key(base_url: str) -> bool:
    """OpenAI, or an endpoint on this machine's loopback. Read for every call: parsed once
    (the URL and the address cost 1% of a worker's CPU at zero latency)."""
    host = (urlsplit(base_url).hostname or "").lower()
    return host == OPENAI_HOST or is_loopback(host)


def is_loopback(host: str) -> bool:
    """True for `localhost` and a loopback IP address (127.0.0.0/8, ::1); False for a name."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def masked_url(url: str) -> str:
    """`url` with any password replaced by ***, fit for a message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def public_url(url: str) -> str:
    """`url` as it may be shown anywhere: scheme, host, port and path only. The user and
    password, and the query and fragment (where some gateways take the key: `?api-key=...`),
    are left out rather than masked."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # not a URL a client could have used: say nothing of it
        return "(an invalid URL)"
    if not parts.hostname:
        return "(a URL without a host)"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def settings_problem(exc: ValidationError) -> str:
    """One invalid setting as one line, named by its variable, with the value given unless it
    may hold a secret (a URL, a key, a password)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc:  # a rule across settings: the message names them
        return f"invalid settings: {message}"
    name = "DOCQ_" + loc[0].upper()
    shown = "" if any(w in name for w in ("PASSWORD", "KEY", "URL")) else (
        f"={first.get('input')!r}" if isinstance(first.get("input"), str | int | float) else "")
    return f"invalid setting {name}{shown}: {message}"


REDIS_SCHEMES = ("redis", "rediss", "unix")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def url_scheme(url: str) -> str:
    """The scheme of `url` in lower case ("" when it has none)."""
    scheme, sep, _ = url.partition("://")
    return scheme.lower() if sep else ""


def absolute_sqlite_url(url: str) -> str:
    """A SQLite URL with a relative file path made absolute against this working directory.

    `sqlite:///docq.db` read in two directories is two stores; resolved once, in the process
    that reads the settings, and handed on, it is one. Other URLs are returned as they are.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path, sep, query = url[len(prefix):].partition("?")
    if not path or path == ":memory:" or path.startswith("/"):
        return url
    return f"{prefix}{Path(path).expanduser().resolve()}{sep}{query}"


class Settings(BaseSettings):
    """docqueue's configuration. Units are in the names."""

    model_config = SettingsConfigDict(
        env_prefix="DOCQ_", env_file=".env", extra="ignore", validate_default=True
    )

    # Stores and transport.
    database_url: str = "sqlite:///docq.db"
    broker_url: str | None = Field(
        default=None, description="Where the Celery tasks travel: Redis (redis://, rediss://, "
        "unix://) or RabbitMQ (amqp://, amqps://); unset means the embedded Redis under `home`."
    )
    redis_url: str | None = Field(
        default=None, description="docqueue's own Redis (limiter, leases, heartbeats, progress, "
        "cache, chord counters and results); unset: the broker's when it is Redis, else the "
        "embedded Redis under `home`. Required with a RabbitMQ broker."
    )
    home: Path = Field(default=Path(".docq"), description="State of the embedded services.")
    config_path: Path = Field(
        default=Path("docq.toml"), validation_alias="DOCQ_CONFIG",
        description="The schedules file for `docq beat`.",
    )
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    flower_port: int = 5555
    flower_address: str = "127.0.0.1"

    # The model endpoint.
    llm_base_url: str | None = Field(default=None, description="Unset means the local model.")
    llm_api_key: SecretStr | None = None
    llm_model: str | None = None
    llm_mode: LLMMode | None = Field(
        default=None, description="chat or completion; unset: completion for the local model."
    )
    llm_rpm: int | None = Field(default=None, gt=0)
    llm_tpm: int | None = Field(default=None, gt=0)
    llm_limit_period_s: float = Field(
        default=60.0, gt=0, allow_inf_nan=False,
        description="The window DOCQ_LLM_RPM and DOCQ_LLM_TPM (and limits learned from the "
        "provider's headers) are per: the limiter's buckets refill one limit per this many "
        "seconds. 60 for every provider that meters per minute; shorter only for a provider "
        "(or simulator) that meters a shorter window.")
    llm_tpm_charge: Literal["max_tokens", "usage"] = Field(
        default="max_tokens",
        description="How the provider charges TPM: prompt + max_tokens at admission (OpenAI's "
        "way, and the simulator's) or the usage it reports afterwards.",
    )
    llm_client: Literal["langchain", "lean"] = Field(
        default="langchain", description="langchain: langchain-openai and the OpenAI SDK. lean: "
        "one aiohttp request per call, the same body, errors, usage and headers, 6-8 ms of a "
        "worker's CPU a call less (benchmarks/bench_limit.py); for endpoints fast enough that "
        "the worker's CPU sets the pace.")
    llm_prompt_cache_key: Literal["auto", "on", "off"] = Field(
        default="auto", description="Send each call a prompt_cache_key, docq-<job>-<pipeline>: "
        "OpenAI routes the calls of one key to the machines that hold their shared prefix, so "
        "a job's calls find its instructions in the prompt cache. auto: on for api.openai.com "
        "and for an endpoint on this machine's loopback (the simulator; local servers ignore "
        "fields they do not know), off for other endpoints, which may refuse an unknown field, "
        "and for the local model.")
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_tokens: int = Field(default=256, gt=0)
    llm_temperature: float = 0.0
    llm_max_inflight: int = Field(default=256, gt=0, description="Global in-flight cap.")
    llm_adaptive_concurrency: Literal["auto", "on", "off"] = Field(
        default="auto", description="Hold the calls in flight to a window that grows while "
        "answers come back steadily and shrinks on 429s, 5xx, timeouts and rising latency "
        "(AIMD). auto: only while the endpoint has no rate limit, configured or learned.")
    llm_concurrency_floor: int = Field(default=2, gt=0, description="The adaptive window's least.")
    llm_concurrency_start: int = Field(default=32, gt=0, description="The adaptive window's start.")
    llm_context_tokens: int | None = Field(
        default=None, gt=0, description="The model's context window (prompt plus output); unset: "
        "the known window of the model (KNOWN_CONTEXT_TOKENS), else 4096.")
    prices: dict[str, Price] = Field(default_factory=lambda: dict(DEFAULT_PRICES))

    # Work shape.
    chunk_tokens: int | None = Field(
        default=None, gt=0, description="Unset: as large as the context window allows after "
        "the pipeline's prompt and output cap (workers/jobs/sizing.py).")
    chunk_overlap_tokens: int = Field(default=40, ge=0)
    batch_max_chunks: int = Field(
        default=100, gt=0, description="Chunks per batch in the middle of a job "
        "(workers/ingest/batching.py, BatchSizes).")
    batch_min_chunks: int = Field(
        default=16, gt=0, description="Chunks in a job's first batch and, at least, in each of "
        "its last ones; at or above DOCQ_BATCH_MAX_CHUNKS every batch is that size.")
    batch_max_tokens: int = Field(default=20_000, gt=0)
    max_document_bytes: int = Field(default=20_000_000, gt=0)
    max_attempts: int = Field(default=5, gt=0, description="Model calls per chunk at most.")
    retry_backoff_base_s: float = Field(default=1.0, gt=0)
    limiter_max_wait_s: float = Field(
        default=5.0, ge=0, description="Longer waits for rate-limit budget re-queue the batch "
        "(a wait for an in-flight slot stays in the process while the batch may run)."
    )
    worker_inflight: int = Field(
        default=256, gt=0, description="Model calls in flight per process at most (the global "
        "cap, DOCQ_LLM_MAX_INFLIGHT, binds across processes).")
    worker_concurrency: int | None = Field(
        default=None, gt=0, description="Processes per `docq worker` (unset: one per core).")
    worker_batches: int | None = Field(
        default=None, gt=0, description="Batches open at once per worker process (unset: "
        "enough to keep DOCQ_LLM_MAX_INFLIGHT calls in flight).")

    # Prometheus metrics (tasks/exporter.py): each `docq worker` main process and `docq beat`
    # serve /metrics on a port of their own; 0 is off, so two workers on one machine never
    # fight over a port nobody asked for.
    metrics_port: int = Field(default=0, ge=0, le=65535, description="A worker's /metrics "
                              "port; 0 is off.")
    beat_metrics_port: int = Field(default=0, ge=0, le=65535, description="Beat's /metrics "
                                   "port; 0 is off.")
    metrics_address: str = Field(default="127.0.0.1", description="Address /metrics binds.")
    metrics_dir: Path | None = Field(
        default=None, description="Where a worker's processes keep their metric files (one "
        "directory per worker main process under it); unset: `home`/metrics.")

    # The batch lane (`--lane batch`): the provider's Batch API, polled by beat.
    batch_poll_s: float = Field(
        default=60.0, gt=0, description="How often beat sends, polls and records provider "
        "batches.")
    batch_file_max_requests: int = Field(
        default=50_000, gt=0, description="Requests per Batch API file (OpenAI: 50,000).")
    batch_file_max_bytes: int = Field(
        default=200 * 1024 * 1024, gt=0, description="Bytes per Batch API file (OpenAI: "
        "200 MB).")
    batch_enqueued_token_limit: int | None = Field(
        default=None, gt=0, description="Prompt tokens the model may have in unfinished "
        "provider batches (the organisation's enqueued-token limit); unset: no limit.")

    # Celery limits: model timeout < soft limit < hard limit < visibility timeout.
    task_soft_time_limit_s: int = 540
    task_time_limit_s: int = 600
    retry_backoff_max_s: int = 300
    visibility_timeout_s: int = 3600
    lease_s: int = Field(
        default=660, gt=0, description="How long a lease stands when its owner's heartbeat "
        "cannot be read (Redis lost its record); with the heartbeat readable, a live owner "
        "keeps its lease and a dead one loses it at once, whatever this says.")
    # Liveness: each delivery's heartbeat key lives heartbeat_ttl_s and is refreshed every
    # heartbeat_s; a dead worker's batches are sent again about heartbeat_ttl_s + heartbeat_s
    # after it died (workers/batch/liveness.py).
    heartbeat_s: float = Field(
        default=2.0, gt=0, description="How often a worker process refreshes its deliveries' "
        "heartbeats, and how often each worker's main process looks for dead ones.")
    heartbeat_ttl_s: float = Field(
        default=10.0, gt=0, description="A delivery whose heartbeat is this old is dead: its "
        "leases are free and its batch is sent again.")
    max_deliveries: int = Field(
        default=5, gt=0, description="Poison guard: a chunk is failed once the worker handling "
        "it died this many times (at least 3: two with its batch, then one with the chunk alone).")
    reconcile_every_s: float = Field(
        default=60.0, gt=0, description="How often beat runs the reconciler."
    )
    retention_days: float | None = Field(
        default=None, gt=0, description="Beat purges the final jobs that finished this many "
        "days ago (their documents, chunks and results; not the response cache). Unset: never.")
    worker_max_memory_mb: float = Field(
        default=1024, ge=0, description="A pool process past this RSS is replaced after its "
        "batch; 0 is off."
    )
    worker_soft_shutdown_s: float = Field(
        default=20.0, ge=0, description="Cold shutdown: how long running batches get before "
        "they are cut and re-queued."
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Resolved once, here: every process a command starts is handed the same directory,
        # whatever its own working directory.
        return home.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _absolute_sqlite_path(cls, url: str) -> str:
        return absolute_sqlite_url(url)

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str | None) -> str | None:
        if url is not None and url_scheme(url) not in REDIS_SCHEMES + AMQP_SCHEMES:
            raise ValueError(f"unknown scheme in {masked_url(url)}: use redis://, rediss:// or "
                             "unix:// (Redis), or amqp:// or amqps:// (RabbitMQ)")
        return url

    @field_validator("llm_base_url")
    @classmethod
    def _no_credentials_in_the_endpoint(cls, url: str | None) -> str | None:
        # The client sends the key as a bearer token; credentials in the URL cannot go beside
        # it (every call failed with the HTTP library's complaint), and would be printed.
        if url is not None and (urlsplit(url).username or urlsplit(url).password):
            raise ValueError(f"{masked_url(url)} carries credentials (user:password@): put the "
                             "API key in DOCQ_LLM_API_KEY and leave the URL without them")
        return url

    @field_validator("redis_url")
    @classmethod
    def _a_redis(cls, url: str | None) -> str | None:
        if url is not None and url_scheme(url) not in REDIS_SCHEMES:
            raise ValueError(f"{masked_url(url)} is not a Redis URL: docqueue keeps its limiter, "
                             "leases, heartbeats and chord counters in Redis (redis://, "
                             "rediss:// or unix://)")
        return url

    @model_validator(mode="after")
    def _check_redis_for_amqp(self) -> Settings:
        if self.broker_url is not None and not self.broker_is_redis and self.redis_url is None:
            raise ValueError(
                f"DOCQ_BROKER_URL is RabbitMQ ({masked_url(self.broker_url)}) and DOCQ_REDIS_URL "
                "is unset: set DOCQ_REDIS_URL to the Redis that holds docqueue's limiter, leases "
                "and chord counters (redis://HOST:PORT/DB)")
        return self

    @property
    def broker_is_redis(self) -> bool:
        """True unless the broker is RabbitMQ (the embedded Redis, when unset, is Redis)."""
        return self.broker_url is None or url_scheme(self.broker_url) in REDIS_SCHEMES

    @property
    def state_redis_url(self) -> str | None:
        """docqueue's own Redis: DOCQ_REDIS_URL, else a Redis broker's URL; None: embedded."""
        if self.redis_url:
            return self.redis_url
        return self.broker_url if self.broker_is_redis else None

    @model_validator(mode="after")
    def _check_time_limits(self) -> Settings:
        order = [
            ("DOCQ_LLM_TIMEOUT_S", self.llm_timeout_s),
            ("DOCQ_TASK_SOFT_TIME_LIMIT_S", self.task_soft_time_limit_s),
            ("DOCQ_TASK_TIME_LIMIT_S", self.task_time_limit_s),
            ("DOCQ_VISIBILITY_TIMEOUT_S", self.visibility_timeout_s),
        ]
        for (low_name, low), (high_name, high) in itertools.pairwise(order):
            if not low < high:
                raise ValueError(f"{low_name} ({low}) must be below {high_name} ({high})")
        if not 2 * self.heartbeat_s <= self.heartbeat_ttl_s:
            # One refresh lost to a Redis hiccup must not make a live delivery look dead.
            raise ValueError(f"DOCQ_HEARTBEAT_TTL_S ({self.heartbeat_ttl_s}) must be at least "
                             f"twice DOCQ_HEARTBEAT_S ({self.heartbeat_s})")
        if self.retry_backoff_max_s >= self.visibility_timeout_s:
            raise ValueError("DOCQ_RETRY_BACKOFF_MAX_S must be below DOCQ_VISIBILITY_TIMEOUT_S")
        if self.chunk_tokens is not None and self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("DOCQ_CHUNK_OVERLAP_TOKENS must be below DOCQ_CHUNK_TOKENS")
        return self

    @property
    def uses_local_model(self) -> bool:
        return self.llm_base_url is None

    @property
    def model_name(self) -> str:
        if self.llm_model:
            return self.llm_model
        return LOCAL_MODEL_NAME if self.uses_local_model else "gpt-4o-mini"

    @property
    def context_tokens(self) -> int:
        """The model's context window: the setting, else the known one, else a modest guess."""
        if self.llm_context_tokens is not None:
            return self.llm_context_tokens
        return KNOWN_CONTEXT_TOKENS.get(self.model_name, UNKNOWN_CONTEXT_TOKENS)

    @property
    def mode(self) -> LLMMode:
        if self.llm_mode:
            return self.llm_mode
        return "completion" if self.uses_local_model else "chat"

    @property
    def key_fingerprint(self) -> str:
        """A short hash of the API key: safe to use in Redis keys and logs."""
        secret = self.llm_api_key.get_secret_value() if self.llm_api_key else ""
        return hashlib.sha256(secret.encode()).hexdigest()[:12]

    @property
    def sends_prompt_cache_key(self) -> bool:
        """Whether calls carry a prompt_cache_key (DOCQ_LLM_PROMPT_CACHE_KEY)."""
        if self.llm_prompt_cache_key != "auto":
            return self.llm_prompt_cache_key == "on"
        if self.llm_base_url is None:
            return False
        return _takes_prompt_cache_key(self.llm_base_url)

    def price_for(self, model: str) -> Price | None:
        return self.prices.get(model)
