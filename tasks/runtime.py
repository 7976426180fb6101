"""Per-process resources: settings, the session factory, the event loop and the model client.

`runtime()` is called inside the process that uses it (a forked worker child, the CLI); a
process that finds a runtime inherited across fork builds its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from models import make_sessionmaker
from workers.limiter import Limiter, Limits, scope_for
from workers.llm import EndpointConfig, OpenAICompatibleLLM
from workers.processing import Services
from workers.settings import Settings

T = TypeVar("T")


def resolve_broker(settings: Settings) -> str:
    """The Redis URL: DOCQ_BROKER_URL, or the embedded server under DOCQ_HOME (started once)."""
    if settings.broker_url:
        return settings.broker_url
    from workers.embedded import EmbeddedRedis

    return EmbeddedRedis(settings.home).start().url


def resolve_endpoint(settings: Settings) -> str:
    """The model's base URL: DOCQ_LLM_BASE_URL, or the local model server if one is running."""
    if settings.llm_base_url:
        return settings.llm_base_url
    from workers.localmodel import LocalModelServer

    url = LocalModelServer(settings.home).running_url()
    if url is None:
        raise RuntimeError(
            "no model endpoint: set DOCQ_LLM_BASE_URL to an OpenAI-compatible server, "
            "or start the local model with `docq demo`"
        )
    return url


@dataclass
class Runtime:
    settings: Settings
    sessions: sessionmaker[Session]
    pid: int = field(default_factory=os.getpid)
    _loop: asyncio.AbstractEventLoop | None = None
    _services: Services | None = None
    _redis: aioredis.Redis | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # One loop per process, kept open: async clients cached on it stay valid.
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def services(self) -> Services:
        if self._services is None:
            self._services = self.run(self._build_services())
        return self._services

    async def _build_services(self) -> Services:
        s = self.settings
        base_url = resolve_endpoint(s)
        llm = OpenAICompatibleLLM(EndpointConfig(
            base_url=base_url, model=s.model_name, mode=s.mode,
            api_key=s.llm_api_key.get_secret_value() if s.llm_api_key else None,
            timeout_s=s.llm_timeout_s, temperature=s.llm_temperature,
            max_connections=s.worker_inflight,
        ))
        redis = aioredis.Redis.from_url(resolve_broker(s), socket_timeout=10,
                                        socket_connect_timeout=5)
        limiter = Limiter(
            redis, scope_for(base_url, s.model_name, s.key_fingerprint),
            Limits(rpm=s.llm_rpm, tpm=s.llm_tpm, max_inflight=s.llm_max_inflight,
                   refund_unused_tokens=s.llm_tpm_charge == "usage"),
            slot_ttl_s=s.llm_timeout_s + 30,
        )
        self._redis = redis
        return Services(self.sessions, s, llm, limiter, asyncio.Semaphore(s.worker_inflight),
                        redis=redis, endpoint=base_url)

    def close(self) -> None:
        """Close what this process opened; after fork, only forget the parent's connections."""
        engine = self.sessions.kw["bind"]
        if self.pid != os.getpid():
            engine.dispose(close=False)
            return
        if self._services is not None:
            self.run(self._services.llm.aclose())
        if self._redis is not None:
            self.run(self._redis.aclose())
        if self._loop is not None:
            self._loop.close()
        engine.dispose()


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use after fork."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        settings = Settings()
        _runtime = Runtime(settings, make_sessionmaker(settings.database_url))
    return _runtime


def reset_runtime() -> None:
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()
