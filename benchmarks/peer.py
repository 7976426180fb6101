"""The peer docqueue is measured against: one asyncio process that throttles as the OpenAI
cookbook's parallel request processor does.

Its rules, restated: request and token capacity refill continuously (limit / 60 per second, up
to one minute's limit); a request goes out once both capacities cover it (one request; its
prompt tokens plus max_tokens); the loop looks again every millisecond; a request answered 429
goes back in the queue, and no request leaves for 15 s after the last 429. Calls in flight are
capped too (the cap every scenario gives docqueue). With no limits given it sends as fast as
the cap allows. No store, no retries beyond 429, no crash safety: the bare throughput to beat.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp

RATE_LIMIT_PAUSE_S = 15.0
LOOP_S = 0.001


@dataclass
class PeerRun:
    started: float
    done_at: list[float] = field(default_factory=list)  # time.time() of each success
    latencies_ms: list[float] = field(default_factory=list)  # of each success
    rate_limited: int = 0
    errors: int = 0
    finished: float = 0.0


async def run_peer(base_url: str, model: str, requests: list[tuple[dict[str, Any], int]], *,
                   rpm: int | None, tpm: int | None, max_inflight: int,
                   api_key: str = "sk-peer") -> PeerRun:
    """Send `requests` ((chat body, tokens it is charged)) and return when all have succeeded."""
    run = PeerRun(started=time.time())
    queue = deque(requests)
    left = len(requests)
    cap_r, cap_t = float(rpm or 0), float(tpm or 0)
    last = time.monotonic()
    last_429 = -RATE_LIMIT_PAUSE_S
    inflight = 0
    headers = {"Authorization": f"Bearer {api_key}"}
    connector = aiohttp.TCPConnector(limit=max_inflight)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def call(item: tuple[dict[str, Any], int]) -> None:
            nonlocal inflight, left, last_429
            sent = time.monotonic()
            try:
                async with http.post(f"{base_url}/chat/completions", json=item[0],
                                     headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                status = 0
            inflight -= 1
            if status == 200:
                run.done_at.append(time.time())
                run.latencies_ms.append(1000 * (time.monotonic() - sent))
                left -= 1
                return
            if status == 429:
                run.rate_limited += 1
                last_429 = time.monotonic()
            else:
                run.errors += 1
            queue.append(item)

        tasks: set[asyncio.Task[None]] = set()
        while left:
            now = time.monotonic()
            elapsed, last = now - last, now
            if rpm:
                cap_r = min(cap_r + rpm * elapsed / 60, rpm)
            if tpm:
                cap_t = min(cap_t + tpm * elapsed / 60, tpm)
            paused = now - last_429 < RATE_LIMIT_PAUSE_S
            while queue and not paused and inflight < max_inflight:
                body, charge = queue[0]
                if (rpm and cap_r < 1) or (tpm and cap_t < charge):
                    break
                queue.popleft()
                cap_r -= 1 if rpm else 0
                cap_t -= charge if tpm else 0
                inflight += 1
                task = asyncio.create_task(call((body, charge)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(LOOP_S)
    run.finished = time.time()
    return run
