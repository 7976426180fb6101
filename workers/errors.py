"""docqueue's exceptions.

WorkerError
├── RetryableError            transient: retry with backoff
│   └── RetryableLLMError       429, 408, 409, 5xx, timeout, connection, malformed body or output
│       └── RateLimitedError      429 with the provider's Retry-After
├── PermanentError            retrying cannot help
│   ├── PermanentLLMError       400 (context length too), 401, 403, 404, content filter, quota
│   └── InputError              a document or option the user gave is unusable
│       └── PipelineError         unknown pipeline or bad pipeline options
└── StoreError                the results store cannot be reached
"""

from __future__ import annotations


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
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.retry_after_s = retry_after_s


class RateLimitedError(RetryableLLMError):
    """429: the provider asked us to slow down."""


class PermanentLLMError(LLMErrorMixin, PermanentError):
    def __init__(self, message: str, *, http_status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.code = code


class InputError(PermanentError):
    """Unusable input: the message names the input and the problem."""


class PipelineError(InputError):
    """An unknown pipeline, or options it cannot work with."""


class StoreError(WorkerError):
    """The results store could not be reached or written."""
