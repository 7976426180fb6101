"""Per-process resources: settings, the session factory, the event loop and the model client.

`runtime()` is called inside the process that uses it (a forked worker child, the CLI); a
process that finds a runtime inherited across fork builds its own.

The event loop runs in a thread of its own, and `Runtime.run` hands it coroutines from any
thread. A prefork child runs one batch at a time on it; a worker started with `--pool threads
-c N` runs N batches at once in one process, all sharing one loop, one connection pool and one
in-flight semaphore: the layout for latency-bound work (benchmarks/bench_latency.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import make_sessionmaker, store_id
from docqueue.tasks.limits import limiter_for
from docqueue.workers.batch.liveness import Heartbeat
from docqueue.workers.batch.metering import MeteredLLM
from docqueue.workers.batch.services import Services
from docqueue.workers.batch.trouble import TroubleLog
from docqueue.workers.errors import WorkerError
from docqueue.workers.settings import Settings, masked_url, public_url

T = TypeVar("T")

# Threads for the database work a loop sends off (`asyncio.to_thread`): asyncio's default of
# cores + 4 is too few when a threads-pool worker has many batches open at once.
DB_THREADS = 32
REDIS_CONNECTIONS = 64  # per process


class WrongStoreError(WorkerError):
    """A task names a results store other than the one this process is configured with."""


def resolve_redis(settings: Settings) -> str:
    """docqueue's own Redis (limiter, leases, heartbeats, chord counters and results):
    DOCQ_REDIS_URL, else a Redis DOCQ_BROKER_URL, else the embedded server under DOCQ_HOME
    (started once)."""
    if (url := settings.state_redis_url) is not None:
        return url
    from docqueue.workers.local.embedded_redis import EmbeddedRedis

    return EmbeddedRedis(settings.home).start().url


def resolve_broker(settings: Settings) -> str:
    """Where the Celery tasks travel: DOCQ_BROKER_URL (Redis or RabbitMQ), else the Redis of
    `resolve_redis`."""
    return settings.broker_url or resolve_redis(settings)


def max_memory_kib(settings: Settings) -> int | None:
    """Celery's `worker_max_memory_per_child` (KiB) from DOCQ_WORKER_MAX_MEMORY_MB; 0 is off."""
    mb = settings.worker_max_memory_mb
    return int(mb * 1024) if mb > 0 else None


def resolve_endpoint(settings: Settings) -> str:
    """The model's base URL: DOCQ_LLM_BASE_URL, or the local model server if one is running."""
    if settings.llm_base_url:
        return settings.llm_base_url
    from docqueue.workers.local.model import LocalModelServer

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
    _thread: threading.Thread | None = None
    _services: Services | None = None
    _redis: aioredis.Redis | None = None
    _beat_redis: aioredis.Redis | None = None
    _store_id: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store_id(self) -> str:
        """This process's results store's identity (read once)."""
        if self._store_id is None:
            with self.sessions() as session:
                self._store_id = store_id(session)
        return self._store_id

    def check_store(self, expected: str | None, what: str) -> None:
        """Refuse work recorded in another store than this process's.

        Raises:
            WrongStoreError: the producer that sent `what` wrote to a different store.
        """
        if expected is not None and expected != self.store_id:
            raise WrongStoreError(
                f"{what} was recorded in another results store than this worker's "
                f"({masked_url(self.settings.database_url)}): the producer and the worker must "
                "use the same DOCQ_DATABASE_URL (a relative SQLite path is read from each "
                "process's own directory)")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # One loop per process, kept running: async clients cached on it stay valid.
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(ThreadPoolExecutor(DB_THREADS, "docq-db"))
                self._thread = threading.Thread(target=loop.run_forever, name="docq-loop",
                                                daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the process's loop and wait for it; callable from any other thread.

        An exception raised in the waiting thread (a soft time limit, an interrupt) cancels
        the coroutine before it goes up.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def services(self) -> Services:
        if self._services is None:
            services = self.run(self._build_services())
            with self._lock:
                if self._services is None:
                    self._services = services
                    return services
            self.run(services.llm.aclose())  # another thread built them first
        assert self._services is not None
        return self._services

    async def _build_services(self) -> Services:
        # Imported here: langchain-openai and the SDK cost a producer or a `docq status` over a
        # second and ~50 MiB, and only a worker calls the model.
        from docqueue.workers.provider.client import EndpointConfig, OpenAICompatibleLLM
        from docqueue.workers.provider.lean import LeanLLM

        s = self.settings
        base_url = resolve_endpoint(s)
        client = LeanLLM if s.llm_client == "lean" else OpenAICompatibleLLM
        llm = MeteredLLM(client(EndpointConfig(
            base_url=base_url, model=s.model_name, mode=s.mode,
            api_key=s.llm_api_key.get_secret_value() if s.llm_api_key else None,
            timeout_s=s.llm_timeout_s, temperature=s.llm_temperature,
            max_connections=s.worker_inflight,
        )), s, base_url)
        # Every call in flight talks to Redis (stop flag, limiter): a blocking pool makes a
        # call beyond REDIS_CONNECTIONS wait its turn instead of failing "Too many connections".
        # (from_pool: closing the client closes the pool too.)
        redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            resolve_redis(s), max_connections=REDIS_CONNECTIONS, timeout=10, socket_timeout=10,
            socket_connect_timeout=5, driver_info=None))
        limiter = limiter_for(s, redis, base_url)
        self._redis = redis
        # The heartbeat's own connection: it must not wait behind the calls for one of the pool.
        # Its timeouts stay well inside a heartbeat TTL, so a lost Redis shows as a lapse.
        beat_timeout_s = max(1.0, s.heartbeat_ttl_s / 4)
        self._beat_redis = aioredis.Redis.from_url(
            resolve_redis(s), socket_timeout=beat_timeout_s, socket_connect_timeout=beat_timeout_s,
            driver_info=None)
        heartbeat = Heartbeat(self._beat_redis, s.heartbeat_s, s.heartbeat_ttl_s)
        return Services(self.sessions, s, llm, limiter, asyncio.Semaphore(s.worker_inflight),
                        redis=redis, endpoint=base_url, heartbeat=heartbeat,
                        troubles=TroubleLog(redis, public_url(base_url), s.max_attempts))

    def open_ahead(self) -> None:
        """Build the services and open the connections a job's first calls will need, now
        rather than on its first batches: those all start at once, and each Redis or store
        connection they opened (and the limiter's scripts, loaded on first use) delayed the
        first result by a second or more. Called at worker start; raises what it met."""
        svc = self.services()
        self.run(self._open_ahead(svc))

    async def _open_ahead(self, svc: Services) -> None:
        if svc.limiter is not None:
            await svc.limiter.load_scripts()
        await asyncio.gather(*(svc.redis.ping() for _ in range(REDIS_CONNECTIONS)))
        if self._beat_redis is not None:
            await self._beat_redis.ping()

        def connect() -> None:
            with self.sessions() as session:
                session.connection()
                time.sleep(0.05)  # held a moment, so the others open connections of their own

        pool = self.sessions.kw["bind"].pool
        size = pool.size() if hasattr(pool, "size") else 1  # the connections it keeps open
        await asyncio.gather(*(asyncio.to_thread(connect) for _ in range(size)))

    def close(self) -> None:
        """Close what this process opened; after fork, only forget the parent's connections."""
        engine = self.sessions.kw["bind"]
        if self.pid != os.getpid():
            engine.dispose(close=False)
            return
        if self._services is not None:
            self.run(self._services.llm.aclose())
            if self._services.limiter is not None:
                self.run(self._services.limiter.aclose())
            if self._services.heartbeat is not None:
                self.run(self._services.heartbeat.close())
        if self._redis is not None:
            self.run(self._redis.aclose())
        if self._beat_redis is not None:
            self.run(self._beat_redis.aclose())
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop.close()
        engine.dispose()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def _fresh_lock_after_fork() -> None:
    global _runtime_lock
    _runtime_lock = threading.Lock()  # another thread may have held it when the parent forked


os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def runtime() -> Runtime:
    """This process's runtime, built on first use after fork."""
    global _runtime
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            settings = Settings()
            _runtime = Runtime(settings, make_sessionmaker(settings.database_url))
        return _runtime


def reset_runtime() -> None:
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        rt.close()
