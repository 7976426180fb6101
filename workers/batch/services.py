"""What a batch delivery needs from its worker process, and how a delivery ends.

Guarantees: `Services` is built once per worker process (never at import time) and holds the
process's clients; `Services.db` runs one transaction off the event loop and bounds its idle
time by the heartbeat's TTL (`models.end_if_left_idle`), so a frozen process's locks hold no
other delivery up for longer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.orm import Session, sessionmaker

from docqueue.models import end_if_left_idle
from docqueue.workers.batch.leases import BatchInfo
from docqueue.workers.batch.liveness import Heartbeat
from docqueue.workers.batch.trouble import Trouble, TroubleLog
from docqueue.workers.pipelines import Pipeline, build_pipeline
from docqueue.workers.provider.limiter import Limiter
from docqueue.workers.provider.retry import EndpointDown
from docqueue.workers.settings import Settings

if TYPE_CHECKING:  # the model client imports langchain-openai: a producer never needs it
    from docqueue.workers.provider.client import LLM


@dataclass(frozen=True)
class Outcome:
    """How a delivery ended: the batch is done, or it should run again after `retry_in_s`
    (`trouble`: the shared cause its calls met, if that is why)."""

    state: Literal["done", "retry", "missing"]
    retry_in_s: float = 0.0
    reason: str = ""
    trouble: Trouble | None = None


@dataclass
class Services:
    """What a batch needs from its worker process; built once per process."""

    sessions: sessionmaker[Session]
    settings: Settings
    llm: LLM
    limiter: Limiter | None
    inflight: asyncio.Semaphore
    redis: Any = None  # asyncio Redis: the job guard's stop flag and spend counters
    endpoint: str = ""
    heartbeat: Heartbeat | None = None  # None (a REPL, a unit test): leases expire, nothing else
    pipelines: dict[tuple[str, str], Pipeline] = field(default_factory=dict)
    endpoint_down: EndpointDown = field(default_factory=EndpointDown)
    troubles: TroubleLog | None = None  # None (a REPL, a unit test): failures are only logged
    refused: set[int] = field(default_factory=set)  # jobs whose key the endpoint refused here
    # A delivery's first claim runs alone in its process: when a job starts, every open batch
    # claims at once, and the first calls waited for all of those claims to share the CPU.
    starting: asyncio.Lock = field(default_factory=asyncio.Lock)
    # One suspect chunk at a time in a process (workers/batch/leases.py): a process's death
    # counts against every chunk it has in flight, so only one of them may be held alone.
    alone: asyncio.Lock = field(default_factory=asyncio.Lock)

    def pipeline(self, info: BatchInfo) -> Pipeline:
        key = (info.pipeline, info.pipeline_version)
        if key not in self.pipelines:
            self.pipelines[key] = build_pipeline(info.pipeline, info.options)
        return self.pipelines[key]

    async def db(self, fn: Callable[[Session], Any]) -> Any:
        """Run `fn(session)` in one transaction, off the event loop."""

        def run() -> Any:
            with self.sessions.begin() as session:
                # A delivery's transactions are a few statements with nothing in between; one
                # idle for a heartbeat's TTL is a frozen process's, whose locks would hold up
                # the deliveries taking its batch over.
                end_if_left_idle(session, self.settings.heartbeat_ttl_s)
                return fn(session)

        return await asyncio.to_thread(run)
