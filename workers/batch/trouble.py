"""Trouble: one cause shared by a job's failing calls, said in one line for as long as it lasts.

A call can fail for a reason of its own (a chunk too long, output that does not parse) or for
one all of the job's calls share: the endpoint cannot be reached, refuses the API key, answers
429s or 5xx or nothing at all. Only the worker's log knew the second kind; now the process's
`TroubleLog` writes it into docqueue's Redis as the job's trouble record (`keys.job_trouble`):
which service, the cause, since when, how many calls failed, and what docqueue is doing about
it. `docq submit --wait`, `docq status`, `docq top` (through `tasks/records.py`, `job_status`)
and Flower (a waiting batch's retry) print it as `Trouble["message"]`:

    endpoint http://127.0.0.1:8000/v1 unreachable (connection refused) for 12 s, 5 failed
    calls; waiting, retrying every ~8 s

When a call fails. An unreachable endpoint, one without flex capacity, a refused key and a
timeout are trouble at their first failure (none is ever normal, and a timeout takes the whole
DOCQ_LLM_TIMEOUT_S to show: waiting for three would delay the news by minutes); 429s and 5xx at
the STORM_CALLS-th failure in a row (a burst of 429s that one cool-down answers is the limiter
doing its work, and a lone 5xx is the retry's). The record is written at most every
WRITE_EVERY_S per job and process (the failures between are counted into the next write) and
lives a TTL past the next try it announces, so it goes away by itself when the failures stop.

When a call succeeds. The process deletes the record if it knows there is one, and forgets
the job's streak: a successful call costs a dict lookup and no Redis round trip unless there
was trouble. A process knows of the record if it wrote it, or if its job guard saw it: the
guard reads the record with the stop flag, in the one MGET it makes anyway before a call at
most every STOP_POLL_S (batch/guard.py). So a batch that waited out the trouble and came back
to a process that never met it still clears it with its first answer.

Services and the store that the status views cannot reach themselves (their own poll fails)
are said in the same words by `Outages`, on the reading side: docqueue's Redis, the results
store.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from docqueue.workers import keys
from docqueue.workers.clock import monotonic_s, wall_s
from docqueue.workers.errors import (
    AuthenticationRefusedError,
    EndpointUnreachableError,
    FlexUnavailableError,
    RateLimitedError,
    RetryableLLMError,
)

logger = logging.getLogger(__name__)

STORM_CALLS = 3  # failures in a row that make 429s or 5xx trouble
WRITE_EVERY_S = 1.0  # one write per job and process at most this often
GRACE_S = 15.0  # a record outlives the next try it announces by twice its wait and this
MAX_JOBS = 1000  # jobs a process keeps a run of failures for (those that ended in one)


class Cause(enum.StrEnum):
    """What the failing calls (or polls) share."""

    UNREACHABLE = "unreachable"  # connection refused, unknown host: nothing was sent
    NO_CAPACITY = "no_capacity"  # the flex tier's 429 "resource unavailable"
    REFUSED_KEY = "refused_key"  # 401, 403
    RATE_LIMITED = "rate_limited"  # 429s
    SERVER_ERRORS = "server_errors"  # 5xx, cut connections, malformed answers
    TIMEOUTS = "timeouts"  # no answer within DOCQ_LLM_TIMEOUT_S


# What the service does, in the line: "<service> <words> (<detail>) for <time>".
WORDS: dict[Cause, str] = {
    Cause.UNREACHABLE: "unreachable",
    Cause.NO_CAPACITY: "without capacity at the flex tier",
    Cause.REFUSED_KEY: "refuses the API key",
    Cause.RATE_LIMITED: "rate-limiting",
    Cause.SERVER_ERRORS: "failing",
    Cause.TIMEOUTS: "not answering",
}
AT_ONCE = frozenset({Cause.UNREACHABLE, Cause.NO_CAPACITY, Cause.REFUSED_KEY, Cause.TIMEOUTS})


class Trouble(TypedDict):
    """What keeps a job's calls (or the view's own polls) from succeeding just now.

    `JobInfo["trouble"]` is one of these while a running job's calls fail for a shared cause
    (None otherwise); `message` is the one line the views print. `service` never holds a
    credential: an endpoint is shown by scheme, host, port and path only.
    """

    cause: str  # a Cause value
    service: str  # "endpoint http://host:8000/v1", "docqueue's Redis at host:6379", ...
    detail: str  # "connection refused", "HTTP 503", "HTTP 401 invalid_api_key", ...
    since: str | None  # ISO 8601 UTC: the first failure of this run of them
    for_s: float | None  # seconds since then, when read
    failures: int  # failed calls (or polls) seen
    retry_s: float | None  # how often docqueue tries again
    doing: str  # what docqueue is doing about it
    message: str  # the whole line


def describe(cause: str, service: str, detail: str, for_s: float | None, failures: int,
             doing: str) -> str:
    """The one line: `<service> <what> (<detail>) for <time>, <n> failed calls; <doing>`.
    A time under a second is left out (a one-off look cannot say how long), as is a count of
    one (or of none: a view's own polls are not calls)."""
    text = f"{service} {_words(cause)}" + (f" ({detail})" if detail else "")
    if for_s is not None and for_s >= 1:
        text += f" for {duration(for_s)}"
    if failures > 1:
        text += f", {failures:,} failed calls"
    return text + (f"; {doing}" if doing else "")


def cleared(gone: Trouble, for_s: float | None) -> str:
    """The line that says a trouble is over: `<service> (<what>, <detail>) after <time>`."""
    what = ", ".join(w for w in (_words(gone["cause"]), gone["detail"]) if w)
    after = f" after {duration(for_s)}" if for_s is not None and for_s >= 1 else ""
    return f"{gone['service']} ({what}){after}"


def _words(cause: str) -> str:
    try:
        return WORDS[Cause(cause)]
    except ValueError:  # a cause of a newer worker: its name still says something
        return cause.replace("_", " ")


def duration(seconds: float) -> str:
    """`12 s`, `4 min 05 s`, `2 h 10 min`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def trouble(cause: str, service: str, detail: str, *, since: float | None, now: float,
            failures: int, retry_s: float | None, doing: str) -> Trouble:
    """A Trouble record; `since` and `now` in seconds since the epoch."""
    for_s = None if since is None else max(0.0, now - since)
    return {
        "cause": cause, "service": service, "detail": detail,
        "since": None if since is None else datetime.fromtimestamp(since, UTC).isoformat(),
        "for_s": None if for_s is None else round(for_s, 1), "failures": failures,
        "retry_s": retry_s, "doing": doing,
        "message": describe(cause, service, detail, for_s, failures, doing),
    }


def read(raw: bytes | str | None, now: float) -> Trouble | None:
    """The Trouble a job's record in Redis holds (a JSON object); None if absent or torn."""
    try:
        record = json.loads(raw or "")
        retry = record.get("retry_s")
        return trouble(
            str(record["cause"]), str(record["service"]), str(record.get("detail", "")),
            since=float(record["since"]), now=now, failures=int(record.get("failures") or 0),
            retry_s=float(retry) if retry is not None else None,
            doing=str(record.get("doing", "")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# -- what a failed call says -------------------------------------------------------------------


def cause_of(exc: BaseException) -> tuple[Cause, str] | None:
    """The shared cause a failed call points to, with its detail; None for a failure of the
    call's own (a 400, content filtered, output that does not parse)."""
    if isinstance(exc, FlexUnavailableError):
        return Cause.NO_CAPACITY, "HTTP 429 resource_unavailable"
    if isinstance(exc, EndpointUnreachableError):
        return Cause.UNREACHABLE, _unreachable_detail(exc)
    if isinstance(exc, AuthenticationRefusedError):
        return Cause.REFUSED_KEY, _http(exc.http_status, exc.code)
    if isinstance(exc, RateLimitedError):
        return Cause.RATE_LIMITED, "HTTP 429"
    if not isinstance(exc, RetryableLLMError):
        return None
    if exc.code == "timeout":
        return Cause.TIMEOUTS, "timed out"
    if exc.http_status is not None and exc.http_status >= 500:
        return Cause.SERVER_ERRORS, _http(exc.http_status, None)
    return {
        "connection_reset": (Cause.SERVER_ERRORS, "connections cut"),
        "malformed_response": (Cause.SERVER_ERRORS, "malformed answers"),
        "connection_error": (Cause.SERVER_ERRORS, "connections failing"),
    }.get(exc.code or "")


def _unreachable_detail(exc: EndpointUnreachableError) -> str:
    if exc.code == "dns_failure":
        return "unknown host"
    return "connection refused" if exc.code == "connection_refused" else "cannot connect"


def _http(status: int | None, code: str | None) -> str:
    return "HTTP " + " ".join(str(p) for p in (status, code) if p)


def doing(cause: Cause, wait_s: float | None, max_attempts: int, job_id: int) -> str:
    """What docqueue does about the cause: its words for the line."""
    about = "" if wait_s is None else f"~{max(1, math.ceil(wait_s))} s"
    if cause in (Cause.UNREACHABLE, Cause.NO_CAPACITY):
        return f"waiting, retrying every {about}" if about else "waiting"
    if cause == Cause.REFUSED_KEY:
        return (f"the job's remaining chunks fail without a call; set DOCQ_LLM_API_KEY for the "
                f"workers, then `docq retry {job_id}`")
    if cause == Cause.RATE_LIMITED:
        return ("every worker waits for its Retry-After" + (f" ({about})" if about else "")
                + ", then retries")
    return (f"retrying each chunk with backoff ({about + ', ' if about else ''}at most "
            f"{max_attempts} attempts)")


# -- the worker's side ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Case:
    """One job's run of failures of one cause in this process."""

    cause: Cause
    detail: str
    since: float  # wall clock of the first
    streak: int = 0  # failures in a row
    unwritten: int = 0  # failures not yet counted in Redis
    written_at: float | None = None  # monotonic clock of this process's last write
    recorded: bool = False  # this process wrote the job's record (of this cause or another)
    retry_s: float | None = None  # the last failure's wait before the next try
    doing: str = ""

    @property
    def is_trouble(self) -> bool:
        return self.cause in AT_ONCE or self.streak >= STORM_CALLS

    def due(self, now: float) -> bool:
        return self.written_at is None or now - self.written_at >= WRITE_EVERY_S


# The record is one JSON string, so a job guard reads it in the MGET of the stop flag. Replace it
# when its cause is another (its `since` was that cause's); for the same cause keep the earlier
# `since` and add this process's failures: one atomic round trip. ARGV: the record, its TTL.
_WRITE = """
local new = cjson.decode(ARGV[1])
local old = redis.call('GET', KEYS[1])
if old then
  local ok, prev = pcall(cjson.decode, old)
  if ok and type(prev) == 'table' and prev.cause == new.cause then
    new.since = math.min(tonumber(prev.since) or new.since, new.since)
    new.failures = (tonumber(prev.failures) or 0) + new.failures
  end
end
redis.call('SET', KEYS[1], cjson.encode(new), 'EX', ARGV[2])
"""


class TroubleLog:
    """A worker process's account of its calls' shared failures, per job (see the module).

    `redis` is the process's asyncio client of docqueue's Redis; `endpoint` its base URL as it
    may be shown (`settings.public_url`).
    """

    def __init__(self, redis: Any, endpoint: str, max_attempts: int) -> None:
        self.redis, self.max_attempts = redis, max_attempts
        self.service = f"endpoint {endpoint}"
        self._cases: dict[int, _Case] = {}
        self._write = redis.register_script(_WRITE)

    async def failed(self, job_id: int, exc: BaseException, wait_s: float | None) -> Trouble | None:
        """Count a failed call of the job; its trouble, if the failures make a case. `wait_s`:
        how long until docqueue tries again (the batch's wait, the chunk's backoff)."""
        found = cause_of(exc)
        if found is None:
            return None
        cause, detail = found
        case = self._cases.get(job_id)
        if case is None or case.cause != cause:
            recorded = case is not None and case.recorded
            case = self._cases[job_id] = _Case(cause, detail, since=wall_s(), recorded=recorded)
            while len(self._cases) > MAX_JOBS:  # jobs that ended in trouble: forget the oldest
                self._cases.pop(next(iter(self._cases)))
        case.detail, case.streak, case.unwritten = detail, case.streak + 1, case.unwritten + 1
        if not case.is_trouble:
            return None
        case.retry_s, case.doing = wait_s, doing(cause, wait_s, self.max_attempts, job_id)
        now = monotonic_s()
        if case.due(now):
            await self._store(job_id, case)
            case.written_at, case.unwritten, case.recorded = now, 0, True
        return self._trouble(case)

    def current(self, job_id: int) -> Trouble | None:
        """The job's trouble as this process last met it; None if it has none."""
        case = self._cases.get(job_id)
        return self._trouble(case) if case is not None and case.is_trouble else None

    def _trouble(self, case: _Case) -> Trouble:
        return trouble(case.cause, self.service, case.detail, since=case.since, now=wall_s(),
                       failures=case.streak, retry_s=case.retry_s, doing=case.doing)

    async def ok(self, job_id: int, seen: bool = False) -> None:
        """A call of the job succeeded: its trouble is over. `seen`: the job guard saw a record
        (another process wrote it). One dict lookup when there was no trouble."""
        case = self._cases.pop(job_id, None)
        if not seen and (case is None or not case.recorded):
            return
        try:
            await self.redis.delete(keys.job_trouble(job_id))
        except Exception as exc:  # Redis away: the record's TTL ends it
            logger.warning("job %s: cannot clear its trouble record: %s", job_id, exc)

    async def _store(self, job_id: int, case: _Case) -> None:
        wait_s = case.retry_s
        ttl = math.ceil(2 * (wait_s if wait_s is not None else GRACE_S) + GRACE_S)
        record = {"cause": case.cause.value, "service": self.service, "detail": case.detail,
                  "since": round(case.since, 3), "failures": case.unwritten,
                  "retry_s": None if wait_s is None else round(wait_s, 3), "doing": case.doing}
        try:
            await self._write(keys=[keys.job_trouble(job_id)], args=[json.dumps(record), ttl])
        except Exception as exc:  # Redis away: the calls go on; the views say Redis is away
            logger.warning("job %s: cannot record its trouble (%s): %s", job_id,
                           case.cause.value, exc)


# -- the reading side ---------------------------------------------------------------------------


class Outages:
    """Since when this process has found each service it reads out of reach (its polls fail),
    so a view that keeps polling can say for how long. `key` names the service ("store",
    "redis"); `service` is how the line names it."""

    DOING = "still waiting"

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def failed(self, key: str, service: str, detail: str) -> Trouble:
        since = self._since.setdefault(key, wall_s())
        return trouble(Cause.UNREACHABLE, service, detail, since=since, now=wall_s(),
                       failures=0, retry_s=None, doing=self.DOING)

    def reached(self, key: str) -> None:
        self._since.pop(key, None)
