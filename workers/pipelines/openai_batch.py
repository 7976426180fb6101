"""OpenAI Batch files: read one as documents, run it as a pipeline, write OpenAI's result files.

An input line is `{"custom_id", "method": "POST", "url", "body"}` for `/v1/chat/completions` or
`/v1/completions`. Each line becomes one document (its id the `custom_id`, its text the request
as canonical JSON) and one chunk, which the workers send to the job's endpoint through the same
limiter, retries and store as any other chunk. `write_openai_batch_results` then writes OpenAI's two
files, in input order: the output file holds one line per successful request, the error file
one line per failed request, so every input line is accounted for exactly once.

What a request may ask for, and what it gets:
- The job's configured model answers every request: the body's `model` is recorded in the
  document's metadata (`requested_model`), and the output body's `model` names the one that
  answered.
- `max_tokens` (or `max_completion_tokens`) is capped by the job's `llm_max_tokens`, which is
  also the default when the body gives none.
- Generation fields in `PASSED_PARAMS` are sent as they are; `stop` and, for chat,
  `response_format` too. `n` and `best_of` must be 1 and `stream` false; `metadata` and
  `store` are ignored. Any other field (tools, logprobs, echo, ...) is a line error rather
  than something silently dropped.
- Chat message content may be a string or a list of text parts (joined with newlines); the
  `developer` role is sent as `system`. A completion `prompt` is one string (or a list of one).

Lines that cannot run become line errors and the rest go on. Problems with the line itself
(not JSON, no usable custom_id, method, url) are reported in the error line's `error`, as OpenAI
reports a failure that got no HTTP response; problems with the body are reported as the 400
response the endpoint would have given. A repeated custom_id stays with its first line; the
repeat is an error line whose custom_id is null, so each custom_id names one request in the
files. A file over OpenAI's limits (50,000 requests, 200 MB) is refused whole, before anything
is stored.

The files are written once the job is final (they would not account for every request
before). A request without a final result then (a cancelled job's) is an error line with code
`batch_cancelled`, or `not_finished`. The `id` and `request_id` of each line are derived from
the job and document ids, so writing the files again gives the same bytes; the provider's own
The parts: `openai_batch_requests.py` (a request body as a prompt), `openai_batch_reading.py`
(the input file as documents), `openai_batch_results.py` (the output and error files).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from docqueue.workers.errors import PipelineError
from docqueue.workers.pipelines.base import Mode, Pipeline, Prompt
from docqueue.workers.pipelines.openai_batch_requests import BadLine, prompt_of
from docqueue.workers.pipelines.prompts import Templates

PIPELINE_NAME = "openai-batch"


class OpenAIBatchPipeline(Pipeline):
    """Each document is one request: sent as it is, its reply stored as it is."""

    name = PIPELINE_NAME
    chunked = False
    VERSION = "openai-batch-r1"

    def __init__(self, options: Mapping[str, Any]) -> None:
        if options:
            raise PipelineError(f"{self.name}: it takes no options, got {', '.join(options)}")
        super().__init__({}, Templates("", "", "", ()))
        self.version = self.VERSION  # the request itself is the prompt: no template to hash

    def render(self, text: str, mode: Mode, level: int = 0) -> Prompt:
        """The request stored as `text`; its url, not the job's mode, picks the endpoint.
        (No reduce: each request is its own document, so `level` is always 0.)"""
        request = json.loads(text)
        try:
            return prompt_of(request["url"], request["body"])
        except BadLine as bad:  # read_openai_batch_file checked it, so the store was edited
            raise PipelineError(f"{self.name}: the stored request {bad.problem}") from None

    def parse(self, raw: str, finish_reason: str | None) -> dict[str, Any]:
        return {"content": raw, "finish_reason": finish_reason}

    def _parse(self, raw: str) -> Any:
        return raw

    def merge(self, outputs: Sequence[Any]) -> Any:
        return outputs[0] if outputs else None
