"""The labels the metrics and a batch's story give: an outcome per failure, an endpoint without
its secrets, a reason that never quotes the model's output."""

from __future__ import annotations

import pytest

from docqueue.workers.batch.story import reason
from docqueue.workers.errors import (
    EndpointUnreachableError,
    PermanentLLMError,
    RateLimitedError,
    RetryableLLMError,
)
from docqueue.workers.metrics import endpoint_label, outcome_of
from docqueue.workers.pipelines.base import OutputParseError


@pytest.mark.parametrize(("exc", "outcome"), [
    (None, "ok"),
    (RateLimitedError("HTTP 429", http_status=429), "429"),
    (RetryableLLMError("HTTP 503", http_status=503), "5xx"),
    (RetryableLLMError("did not answer", code="timeout"), "timeout"),
    (PermanentLLMError("HTTP 400", http_status=400), "permanent"),
    (EndpointUnreachableError("refused", code="connection_refused"), "unreachable"),
    (RetryableLLMError("reset", code="connection_reset"), "error"),
    (OutputParseError("not JSON"), "error"),
])
def test_each_failure_has_its_outcome(exc: BaseException | None, outcome: str) -> None:
    assert outcome_of(exc) == outcome


def test_an_endpoint_label_keeps_only_host_and_port() -> None:
    assert endpoint_label("https://user:s3cret@api.example.com/v1?key=k") == "api.example.com"
    assert endpoint_label("http://127.0.0.1:8000/v1") == "127.0.0.1:8000"


def test_a_reason_is_one_line_and_never_quotes_output() -> None:
    long = "HTTP 400 bad_request: " + "word " * 100 + "\nsecond line"
    assert reason("PermanentLLMError", long, 400).startswith("PermanentLLMError: HTTP 400")
    assert "\n" not in reason("PermanentLLMError", long, 400)
    assert len(reason("PermanentLLMError", long, 400)) <= 160
    quoted = 'classify: expected {"label": "..."}, got "the secret text of the chunk"'
    assert reason("OutputParseError", quoted, None) == (
        "OutputParseError: the model's output could not be used")
    assert reason("RetryableLLMError", "timed out", None) == "RetryableLLMError: timed out"
