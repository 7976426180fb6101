"""How long to wait before trying a failed model call again."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

# Told to wait exactly N seconds, every process would come back in the same instant; spreading
# them over a further tenth of N keeps the provider's bucket from seeing one burst.
FLOOR_SPREAD = 0.1


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    floor_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with full jitter, never shorter than `floor_s` (the Retry-After).

    `attempt` counts the retries already made (0 for the first retry): the delay is drawn
    uniformly from [0, min(cap_s, base_s * 2**attempt)]. When `floor_s` is larger than that
    draw, the result is `floor_s` plus up to FLOOR_SPREAD of it, so the provider's own request
    is honoured even beyond `cap_s`; the caller bounds it (e.g. below the visibility timeout).
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt must be a whole number >= 0, got {attempt!r}")
    _check_positive("base_s", base_s)
    _check_positive("cap_s", cap_s)
    if floor_s is not None and not (math.isfinite(floor_s) and floor_s >= 0):
        raise ValueError(f"floor_s must be a finite number >= 0 or None, got {floor_s!r}")
    # 2**attempt overflows a float past 1023; the cap is reached long before that.
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt, 64))
    delay = ceiling * rand()
    if floor_s is not None and delay < floor_s:
        delay = floor_s * (1.0 + FLOOR_SPREAD * rand())
    return delay


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class EndpointDown:
    """A process's view of an endpoint that accepts no connection: how long batches wait.

    Calls that could not connect are not attempts (nothing was sent), so they must not be
    retried at the pace of attempts either: each batch that meets a refusal hands its chunks
    back and comes again after a wait that doubles, from `base_s` to `cap_s`, while the refusals
    go on, and starts over once a call gets through.
    """

    def __init__(self, base_s: float = 1.0, cap_s: float = 30.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.refusals = 0

    def refused(self) -> float:
        """Count a refusal; the seconds the batch should wait before its next pass."""
        wait = min(self.cap_s, self.base_s * 2.0 ** min(self.refusals, 32))
        self.refusals += 1
        return wait * (0.5 + 0.5 * random.random())  # spread the batches' returns

    def reached(self) -> None:
        self.refusals = 0
