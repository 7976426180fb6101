"""docqueue's exceptions: one tree, each class where it is raised, this page the map.

WorkerError                     the root; every message is written for the user
├── RetryableError              transient: retry with backoff
│   ├── RetryableLLMError         429, 408, 409, 5xx, timeout, connection, malformed body
│   │   ├── RateLimitedError        429 with the provider's Retry-After
│   │   ├── EndpointUnreachableError  connection refused, unknown host: not an attempt
│   │   │   └── FlexUnavailableError  429 "resource unavailable" at the flex tier: a wait
│   │   └── OutputParseError        the model's text cannot be used (pipelines/base.py)
│   └── LimiterBusy               the limiter's wait is too long: re-queue (provider/limiter.py)
├── PermanentError              retrying cannot help
│   ├── PermanentLLMError         400 (context length too), 404, content filter, quota
│   │   └── AuthenticationRefusedError  401, 403: the key is refused; the job's other chunks
│   │                                     fail without a call (batch/guard.py)
│   ├── RequestTooLargeError      a request over the whole token budget (provider/limiter.py)
│   └── InputError                a document, option or setting the user gave is unusable
│       ├── PipelineError           unknown pipeline or bad pipeline options
│       ├── ScheduleError           a bad schedule in docq.toml (jobs/schedules.py)
│       ├── OpenAIBatchFileError    an OpenAI Batch file over its limits
│       │                             (pipelines/openai_batch_reading.py)
│       ├── FlowerAuthError         Flower without credentials (tasks/flower.py)
│       └── NothingToSubmitError    every input of a submit was rejected: no job is recorded
├── JobNotFoundError            no job with that id (also a LookupError)
├── JobNotFinishedError         results asked of a job that is still running
│                                 (pipelines/openai_batch_results.py)
├── ServiceUnavailableError     a service docqueue needs cannot be used (tasks/failures.py maps
│   │                             the drivers' exceptions to these, URLs masked)
│   ├── StoreUnavailableError     the results store: unreachable, refusing the credentials, absent
│   ├── StoreNotMigratedError     the store is reachable but its tables are missing or old
│   ├── BrokerUnavailableError    Redis (broker and chord counters): unreachable or refusing
│   │   └── JobNotPublishedError    a job was recorded but its batches could not be sent
│   └── EndpointCheckError        the model endpoint failed `docq check` (tasks/checks.py)
└── EmbeddedServiceError        an embedded server would not start (local/embedded_redis.py)
    ├── EmbeddedRedisError
    └── LocalModelError           the local model server (local/model.py)
"""

from __future__ import annotations

from collections.abc import Mapping


class WorkerError(Exception):
    """The root of docqueue's errors; the message is written for the user."""


class RetryableError(WorkerError):
    """A transient failure: the same call may succeed later."""


class PermanentError(WorkerError):
    """A failure that retrying cannot fix."""


class LLMErrorMixin:
    """What a failed model call tells us: the HTTP status and the provider's error code."""

    http_status: int | None = None
    code: str | None = None


class RetryableLLMError(LLMErrorMixin, RetryableError):
    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        rate_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.retry_after_s = retry_after_s
        # The response's x-ratelimit-* headers: a 429 says what the provider's budget is, and
        # the limiter must learn it before the pause ends, not from the next success.
        self.rate_headers = dict(rate_headers or {})


class RateLimitedError(RetryableLLMError):
    """429: the provider asked us to slow down."""


class EndpointUnreachableError(RetryableLLMError):
    """No connection could be made (refused, unknown host): the request never left, nothing
    was charged, and the call is not counted as an attempt; the batch waits and comes back."""


class FlexUnavailableError(EndpointUnreachableError):
    """429 "resource unavailable": the flex service tier has no capacity just now. Nothing
    was charged; the batch waits and sends again, without counting an attempt."""


class PermanentLLMError(LLMErrorMixin, PermanentError):
    def __init__(self, message: str, *, http_status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.code = code


class AuthenticationRefusedError(PermanentLLMError):
    """401 or 403: the endpoint refuses the API key (or this key's access). Every call of the
    job with the same key would be refused too, so its remaining chunks fail without one."""


class InputError(PermanentError):
    """Unusable input: the message names the input and the problem."""


class NothingToSubmitError(InputError):
    """A submit whose every input was rejected: no job is recorded (an empty job helps nobody).

    `rejected` holds the first (id, reason) pairs, `count` how many were rejected in all.
    """

    def __init__(self, message: str, *, rejected: list[tuple[str, str]], count: int) -> None:
        super().__init__(message)
        self.rejected = rejected
        self.count = count


class JobNotFoundError(WorkerError, LookupError):
    """No job has this id in the configured results store."""


class ServiceUnavailableError(WorkerError):
    """A service docqueue needs cannot be used; the message names it (URL masked), the setting
    behind it and what to do."""


class StoreUnavailableError(ServiceUnavailableError):
    """The results store cannot be reached, refuses the credentials or does not exist."""


class StoreNotMigratedError(ServiceUnavailableError):
    """The results store is reachable but lacks docqueue's tables (or has older ones)."""


class BrokerUnavailableError(ServiceUnavailableError):
    """Redis, the broker and chord counter, cannot be reached or refuses the credentials."""


class JobNotPublishedError(BrokerUnavailableError):
    """A job is recorded and marked running, but its batches could not be sent: with no publish
    marker in Redis, `docq resume JOB` or beat's reconciler sends them once the broker is back."""

    def __init__(self, message: str, *, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class EndpointCheckError(ServiceUnavailableError):
    """The model endpoint cannot be reached, refuses the API key, or does not serve the model."""


class PipelineError(InputError):
    """An unknown pipeline, or options it cannot work with."""
