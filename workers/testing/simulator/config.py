"""The simulator's options: one frozen dataclass, checked once when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from docqueue.workers.testing.simulator.prefix_cache import DEFAULT_CAPACITY_BLOCKS

DEFAULT_MODEL = "docq-sim"
MIB = 1024 * 1024


class ConfigError(ValueError):
    """An option has a value the simulator cannot use; the message names the option."""


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything `docq simulate` can be told. Units are in the names; None means "no limit"."""

    host: str = "127.0.0.1"
    port: int = 8000
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    # Rate limits, per period (a minute, as OpenAI meters), refilled continuously.
    rpm: int | None = None
    tpm: int | None = None
    period_s: float = 60.0
    # Charged against the TPM budget (and the output cap) when a request sets no max_tokens.
    default_max_tokens: int = 256
    # Output length ~ Normal(mean, sd), at least 1 token, at most the request's max_tokens.
    output_tokens_mean: float = 60.0
    output_tokens_sd: float = 20.0
    # Latency = latency_ms + ms_per_token * output tokens + uniform(0, jitter_ms).
    latency_ms: float = 0.0
    ms_per_token: float = 0.0
    jitter_ms: float = 0.0
    # A self-hosted server (vLLM, llama.cpp): `slots` requests are decoded at once and the rest
    # wait their turn; decoding more than `saturation` together slows each one down in
    # proportion (the server's throughput stops growing there). None: every request at once.
    slots: int | None = None
    saturation: int | None = None
    # Faults: one uniform draw per admitted request picks at most one of them.
    fail_rate: float = 0.0
    timeout_rate: float = 0.0
    garbage_rate: float = 0.0
    timeout_hold_s: float = 600.0
    # Share of service_tier="flex" requests refused 429 resource_unavailable (before admission).
    flex_unavailable_rate: float = 0.0
    context_limit: int | None = None
    # The prompt cache (prefix_cache.py): 128-token blocks of prompt prefixes it remembers;
    # 0 turns it off (every usage then reports cached_tokens 0).
    prefix_cache_blocks: int = DEFAULT_CAPACITY_BLOCKS
    api_key: str | None = field(default=None, repr=False)
    seed: int | None = None
    max_body_bytes: int = 8 * MIB
    log_requests: bool = False
    # Keep every completion request (times, status, prompt) for GET /requests: tests count
    # the calls per prompt with it. Off by default: it grows with every request.
    record_requests: bool = False
    batch_api: BatchApiConfig = field(default_factory=lambda: BatchApiConfig())

    def __post_init__(self) -> None:
        _check_port(self.port)
        if not self.models or any(not m.strip() for m in self.models):
            raise ConfigError("--model: a model name must not be empty")
        for name in ("rpm", "tpm", "context_limit", "slots", "saturation"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{_flag(name)}: must be a positive integer, got {value}")
        if self.prefix_cache_blocks < 0:
            raise ConfigError(
                f"--prefix-cache-blocks: must not be negative, got {self.prefix_cache_blocks}")
        for name in ("default_max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)}: must be at least 1, got {getattr(self, name)}")
        for name in ("output_tokens_sd", "latency_ms", "ms_per_token", "jitter_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{_flag(name)}: must not be negative, got {getattr(self, name)}"
                )
        if self.output_tokens_mean < 1:
            raise ConfigError(
                f"--output-tokens-mean: must be at least 1, got {self.output_tokens_mean}"
            )
        if not (self.period_s >= 0.001 and math.isfinite(self.period_s)):
            raise ConfigError(f"--period-s: must be at least 0.001, got {self.period_s}")
        if self.timeout_hold_s <= 0:
            raise ConfigError(f"--timeout-hold-s: must be positive, got {self.timeout_hold_s}")
        for name in ("fail_rate", "timeout_rate", "garbage_rate", "flex_unavailable_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"--{_flag(name)}: must be between 0 and 1, got {rate}")
        total = self.fail_rate + self.timeout_rate + self.garbage_rate
        if total > 1.0 + 1e-9:
            raise ConfigError(
                f"--fail-rate + --timeout-rate + --garbage-rate must not exceed 1, got {total:g}"
            )

    def describe_limits(self) -> str:
        """A one-line summary for the start-up log; never includes the API key itself."""
        rpm = self.rpm if self.rpm is not None else "unlimited"
        tpm = self.tpm if self.tpm is not None else "unlimited"
        parts = [
            f"models={','.join(self.models)}",
            f"rpm={rpm}",
            f"tpm={tpm}",
            *([f"per {self.period_s:g} s"] if self.period_s != 60 else []),
            (
                f"latency_ms={self.latency_ms:g}+{self.ms_per_token:g}/token"
                f"+jitter {self.jitter_ms:g}"
            ),
            (
                f"faults fail={self.fail_rate:g} timeout={self.timeout_rate:g}"
                f" garbage={self.garbage_rate:g}"
            ),
            f"context_limit={self.context_limit or 'none'}",
            f"prefix_cache_blocks={self.prefix_cache_blocks}",
            f"auth={'on' if self.api_key else 'off'}",
        ]
        return " ".join(parts)


def _flag(attribute: str) -> str:
    return attribute.replace("_", "-")


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: must be between 0 and 65535, got {port}")


@dataclass(frozen=True)
class BatchApiConfig:
    """How the Batch API behaves (`/v1/files`, `/v1/batches`). Limits default to OpenAI's."""

    # A batch's lines are done one after another, evenly, over this many seconds.
    turnaround_s: float = 0.0
    # The completion window: a batch not done this long after its creation expires, keeping
    # the lines it did. OpenAI's only window is 24 h.
    window_s: float = 86_400.0
    # Share of executed lines answered with a 500 in the error file (drawn per batch and line).
    fail_rate: float = 0.0
    # Prompt tokens a model may have in batches not yet final; None = no limit.
    enqueued_token_limit: int | None = None
    max_requests: int = 50_000
    max_file_bytes: int = 200 * MIB

    def __post_init__(self) -> None:
        if self.turnaround_s < 0:
            raise ConfigError(
                f"--batch-turnaround-s: must not be negative, got {self.turnaround_s}")
        if self.window_s <= 0:
            raise ConfigError(f"--batch-window-s: must be positive, got {self.window_s}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ConfigError(f"--batch-fail-rate: must be between 0 and 1, got {self.fail_rate}")
        for name in ("enqueued_token_limit", "max_requests", "max_file_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--batch-{_flag(name)}: must be at least 1, got {value}")
