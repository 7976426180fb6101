"""The global rate limiter's state for `docq status`: a JSON-able dict and its human lines.

The limiter is built exactly as a worker builds it (`limiter_for`), so the status reads the same
Redis keys the workers write. Reading never starts a server: with the embedded Redis or the
local model not running, the dict says so instead.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from docqueue.workers.provider.admission import Limits, scope_for
from docqueue.workers.provider.limiter import Limiter
from docqueue.workers.settings import Settings, public_url

READ_TIMEOUT_S = 5.0


def limits_for(settings: Settings) -> Limits:
    """The budget a worker enforces for these settings."""
    return Limits(
        rpm=settings.llm_rpm,
        tpm=settings.llm_tpm,
        max_inflight=settings.llm_max_inflight,
        period_s=settings.llm_limit_period_s,
        refund_unused_tokens=settings.llm_tpm_charge == "usage",
        adaptive={"auto": None, "on": True, "off": False}[settings.llm_adaptive_concurrency],
        window_floor=settings.llm_concurrency_floor,
        window_start=settings.llm_concurrency_start,
    )


def limiter_for(settings: Settings, redis: aioredis.Redis, base_url: str) -> Limiter:
    """The Limiter of one endpoint, model and API key, as every worker process builds it."""
    return Limiter(
        redis,
        scope_for(base_url, settings.model_name, settings.key_fingerprint),
        limits_for(settings),
        # Slots are kept alive by their process (Limiter._keep_alive): a dead or frozen
        # worker's calls stop counting against the cap one heartbeat TTL later.
        slot_ttl_s=settings.heartbeat_ttl_s,
    )


def limiter_status(settings: Settings) -> dict[str, Any]:
    """The shared limiter's state: limits (configured and learned), use over the last minute,
    calls in flight and any cool-down. `available` is False (with a `reason`) when it cannot
    be read; nothing raises for an unreachable Redis or a missing endpoint."""
    endpoint = _endpoint(settings)
    broker = running_redis(settings)
    base: dict[str, Any] = {
        "endpoint": public_url(endpoint) if endpoint else None,  # a URL may carry the key
        "model": settings.model_name,
        "tpm_charge": settings.llm_tpm_charge,
    }
    if endpoint is None:
        return {**base, "available": False,
                "reason": "no model endpoint: DOCQ_LLM_BASE_URL is unset and the local model "
                          "is not running"}
    if broker is None:
        return {**base, "available": False,
                "reason": "the embedded Redis is not running, so no worker has used the limiter"}
    try:
        snapshot = asyncio.run(_snapshot(settings, broker, endpoint))
    except (RedisError, OSError, TimeoutError) as exc:
        return {**base, "available": False,
                "reason": f"cannot read the limiter from Redis at {redact(broker)}: "
                          f"{type(exc).__name__}: {_scrub(str(exc), broker)}"}
    return {**base, "available": True, **snapshot}


async def _snapshot(settings: Settings, broker: str, endpoint: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(
        broker, socket_timeout=READ_TIMEOUT_S, socket_connect_timeout=READ_TIMEOUT_S
    )
    try:
        return await limiter_for(settings, client, endpoint).snapshot()
    finally:
        await client.aclose()


def format_limiter_status(d: dict[str, Any]) -> str:
    """Human lines: use against each limit and where the limit comes from, in flight, cool-down."""
    head = f"rate limiter for {d.get('model')} at {d.get('endpoint') or 'no endpoint'}"
    if not d.get("available"):
        return f"{head}\n  unavailable: {d.get('reason', 'unknown')}"
    per = "min" if float(d.get("period_s", 60)) == 60 else f"{float(d['period_s']):g} s"
    lines = [head]
    for name in ("requests", "tokens"):
        lines.append(f"  {name}/{per}: {_dimension(d[name])}")
    lines.append(f"  in flight: {d['inflight']:,} of {d['max_inflight']:,}")
    cool = float(d.get("cool_down_s") or 0)
    lines.append(f"  cool-down: {cool:.1f} s left" if cool > 0 else "  cool-down: none")
    return "\n".join(lines)


def _dimension(dim: dict[str, Any]) -> str:
    used, limit = dim["used"], dim["limit"]
    configured, learned = dim["configured"], dim["learned"]
    if limit is None:
        return f"used {used:,} (no limit configured or learned yet)"
    if configured is not None and learned is not None and configured != learned:
        source = (f"configured; the provider reports {learned:,}" if limit == configured
                  else f"learned from the provider; configured {configured:,}")
    elif configured is not None:
        source = "configured"
    else:
        source = "learned from the provider"
    return f"used {used:,} of {limit:,} ({source})"


def redact(url: str) -> str:
    """A URL without its password (a Redis URL may carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


def _scrub(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def _endpoint(settings: Settings) -> str | None:
    if settings.llm_base_url:
        return settings.llm_base_url
    from docqueue.workers.local.model import LocalModelServer

    return LocalModelServer(settings.home).running_url()


def running_redis(settings: Settings) -> str | None:
    """docqueue's Redis URL if it can be used now: the embedded one only if running."""
    if (url := settings.state_redis_url) is not None:
        return url
    from docqueue.workers.local.embedded_redis import EmbeddedRedis

    return EmbeddedRedis(settings.home).running_url()
