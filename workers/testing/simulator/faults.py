"""Injected faults: one seeded draw per admitted request, in the order requests are admitted."""

from __future__ import annotations

import enum
import json
import random
from typing import Any

from docqueue.workers.testing.simulator.config import SimulatorConfig
from docqueue.workers.testing.simulator.protocol import ApiError

_SERVER_ERRORS: tuple[tuple[int, str, str | None], ...] = (
    (500, "The server had an error while processing your request (simulated fault).", None),
    (
        502,
        "Bad gateway: the upstream model server did not answer (simulated fault).",
        "bad_gateway",
    ),
    (
        503,
        "The model is overloaded right now; try again later (simulated fault).",
        "service_unavailable",
    ),
)


class Fault(enum.Enum):
    NONE = "none"
    FAIL = "fail"
    TIMEOUT = "timeout"
    GARBAGE = "garbage"


class FaultInjector:
    """Draws faults with fixed marginal rates; with a seed, the sequence is reproducible."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._rng = random.Random(config.seed)
        self._flex_rng = random.Random(None if config.seed is None else config.seed + 2)
        self._thresholds = (
            (config.fail_rate, Fault.FAIL),
            (config.fail_rate + config.timeout_rate, Fault.TIMEOUT),
            (config.fail_rate + config.timeout_rate + config.garbage_rate, Fault.GARBAGE),
        )

    def draw(self) -> Fault:
        """The fault for the next admitted request (one uniform draw, always taken)."""
        u = self._rng.random()
        for threshold, fault in self._thresholds:
            if u < threshold:
                return fault
        return Fault.NONE

    def flex_unavailable(self, rate: float) -> bool:
        """Whether the flex tier refuses the next flex request (its own seeded draw)."""
        return rate > 0 and self._flex_rng.random() < rate

    def server_error(self) -> ApiError:
        """A 500, 502 or 503 in OpenAI's error shape."""
        status, message, code = self._rng.choice(_SERVER_ERRORS)
        return ApiError(status, message, type="server_error", code=code)

    def garbage(self, body: dict[str, Any]) -> bytes:
        """A 200 body a client cannot use: cut-off JSON, or JSON without `choices`."""
        if self._rng.random() < 0.5:
            text = json.dumps(body)
            return text[: max(1, len(text) // 2)].encode()
        return json.dumps({k: v for k, v in body.items() if k != "choices"}).encode()
