"""A model client that records each call's outcome, duration, usage and cost (workers/metrics.py).

It wraps the client rather than the batch code: every call goes through `complete`, whatever
path in `processing.py` makes it, so the counts cannot miss one. The pipeline label comes from
`metrics.current_pipeline`, which the batch sets for the coroutines of its pass.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from docqueue.workers import metrics
from docqueue.workers.batch.calls import cost_of
from docqueue.workers.pipelines import Prompt
from docqueue.workers.settings import Settings

if TYPE_CHECKING:
    from docqueue.workers.provider.client import LLM, Completion


class MeteredLLM:
    """`llm`, with every call recorded for Prometheus."""

    def __init__(self, llm: LLM, settings: Settings, base_url: str) -> None:
        self._llm, self._settings = llm, settings
        self._endpoint = metrics.endpoint_label(base_url)
        self._operation = "chat" if settings.mode == "chat" else "text_completion"

    async def complete(self, prompt: Prompt, *, max_tokens: int,
                       service_tier: str | None = None,
                       cache_key: str | None = None) -> Completion:
        started = time.perf_counter()
        try:
            completion = await self._llm.complete(prompt, max_tokens=max_tokens,
                                                  service_tier=service_tier, cache_key=cache_key)
        except Exception as exc:
            self._record(time.perf_counter() - started, exc)
            raise
        self._record(completion.latency_ms / 1000, None, completion, service_tier)
        return completion

    async def aclose(self) -> None:
        await self._llm.aclose()

    def _record(self, seconds: float, exc: BaseException | None,
                completion: Completion | None = None, tier: str | None = None) -> None:
        metrics.model_call(
            endpoint=self._endpoint, model=self._settings.model_name, operation=self._operation,
            seconds=seconds, exc=exc,
            tokens_in=completion.tokens_in if completion else 0,
            tokens_out=completion.tokens_out if completion else 0,
            cost=cost_of(self._settings, completion, tier) if completion else None)
