"""Counters behind GET /stats: what the simulator answered, charged and served.

Only the completion endpoints are counted (not /v1/models, /stats or unknown paths), so
that readiness polls and the counters' own reads do not change the numbers.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from docqueue.workers.testing.simulator.limits import LimitKind

# The per-second series keeps the last hour.
SERIES_SECONDS = 3600


@dataclass
class _Second:
    requests: int = 0
    ok: int = 0
    tokens: int = 0
    rate_limited: int = 0
    admitted: int = 0  # requests admitted in this second (counted at admission, not answer)
    admitted_tokens: int = 0  # what those admissions charged

    def as_dict(self, t: int) -> dict[str, int]:
        return {
            "t": t,
            "requests": self.requests,
            "ok": self.ok,
            "tokens": self.tokens,
            "429": self.rate_limited,
            "admitted": self.admitted,
            "admitted_tokens": self.admitted_tokens,
        }


@dataclass
class Stats:
    """Mutable counters; the server runs on one event loop, so no lock is needed."""

    by_status: Counter[int] = field(default_factory=Counter)
    rate_limited: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    tokens_admitted: int = 0
    prompt_tokens_served: int = 0
    cached_tokens_served: int = 0  # of the prompt tokens: those the prefix cache held
    completion_tokens_served: int = 0
    cancelled: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    since_s: float = field(default_factory=time.time)
    series: OrderedDict[int, _Second] = field(default_factory=OrderedDict)

    def begin(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1

    def admitted(self, tokens: int) -> None:
        """Count one admission and its charge, in the second it happened."""
        self.tokens_admitted += tokens
        second = self._second(int(time.time()))
        second.admitted += 1
        second.admitted_tokens += tokens

    def answered(
        self,
        status: int,
        *,
        limited: LimitKind | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> None:
        """Count one response; tokens are the usage of a successful reply."""
        self.by_status[status] += 1
        second = self._second(int(time.time()))
        second.requests += 1
        if limited is not None:
            self.rate_limited[limited] += 1
            second.rate_limited += 1
        if status == 200 and (prompt_tokens or completion_tokens):
            self.prompt_tokens_served += prompt_tokens
            self.cached_tokens_served += cached_tokens
            self.completion_tokens_served += completion_tokens
            second.ok += 1
            second.tokens += prompt_tokens + completion_tokens

    def _second(self, t: int) -> _Second:
        second = self.series.get(t)
        if second is None:
            second = self.series[t] = _Second()
            while len(self.series) > SERIES_SECONDS:
                self.series.popitem(last=False)
        return second

    def reset(self) -> None:
        """Zero every counter except in_flight (those requests are still running)."""
        in_flight = self.in_flight
        fresh = Stats()
        self.__dict__.update(fresh.__dict__)
        self.in_flight = self.peak_in_flight = in_flight

    def snapshot(self) -> dict[str, Any]:
        served = self.prompt_tokens_served + self.completion_tokens_served
        return {
            "since": self.since_s,
            "requests_total": sum(self.by_status.values()),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "rate_limited": {
                "requests": self.rate_limited["requests"],
                "tokens": self.rate_limited["tokens"],
            },
            "faults": {k: self.faults[k] for k in ("fail", "timeout", "garbage")},
            "cancelled": self.cancelled,
            "tokens_admitted": self.tokens_admitted,
            "tokens_served": {
                "prompt": self.prompt_tokens_served,
                "cached_prompt": self.cached_tokens_served,
                "completion": self.completion_tokens_served,
                "total": served,
            },
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "per_second": [s.as_dict(t) for t, s in self.series.items()],
        }
