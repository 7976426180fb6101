"""The pipeline contract: a prompt per chunk, a parse of the model's text, a merge per document.

`Pipeline` is the base every pipeline extends (workers/pipelines/builtin.py holds the four that
ship, workers/pipelines/openai_batch.py the one that replays an OpenAI Batch file); `Prompt` is
the one model call a chunk becomes; `OutputParseError` is raised when the model's text cannot be
used.
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from docqueue.workers.errors import RetryableLLMError
from docqueue.workers.pipelines import prompts
from docqueue.workers.pipelines.prompts import Templates

Mode = Literal["chat", "completion"]


class OutputParseError(RetryableLLMError):
    """The model's output cannot be used; a new sample may parse (bounded by the attempt cap)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="output_parse")


@dataclass(frozen=True)
class Prompt:
    """One model call for one chunk, in either mode."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    response_format: dict[str, Any] | None = None
    stop: list[str] | None = None
    max_tokens: int | None = None  # the pipeline's own cap; None means the job's setting
    # Further generation parameters sent as they are (temperature, top_p, seed, ...).
    params: dict[str, Any] | None = None


class Pipeline(ABC):
    """A prompt, a parse and a merge. Subclasses check their options in `__init__`."""

    name: ClassVar[str]
    # Bump when parse() changes what it accepts or returns, or _completion_chunk() what it
    # sends: the version then changes too (template edits change it by themselves).
    revision: ClassVar[int] = 1
    # False: each document is one chunk, stored whole (an OpenAI Batch request, say).
    chunked: ClassVar[bool] = True

    def __init__(
        self,
        options: dict[str, Any],
        templates: Templates,
        values: Mapping[str, str] | None = None,
        response_format: dict[str, Any] | None = None,
        chat_max_tokens: int | None = None,
        reduce_templates: Templates | None = None,
    ) -> None:
        self._options = options
        self._templates = templates
        self._values = dict(values or {})
        self._response_format = response_format
        self._chat_max_tokens = chat_max_tokens
        self._reduce_templates = reduce_templates
        # Everything that shapes a request except the chunk, and the parse revision.
        sent = [self.revision, asdict(templates), self._values, response_format, chat_max_tokens]
        if reduce_templates is not None:  # a pipeline without a reduce keeps its old version
            sent.append(asdict(reduce_templates))
        digest = hashlib.sha256(json.dumps(sent, ensure_ascii=False).encode()).hexdigest()
        self.version = f"{self.name}-r{self.revision}-{digest[:12]}"

    def describe(self) -> dict[str, Any]:
        """The options as checked, for the job row; `build_pipeline` accepts them back."""
        return copy.deepcopy(self._options)

    @property
    def reduces(self) -> bool:
        """Whether a document's chunk outputs are reduced by the model, level by level, to one
        (workers/jobs/reducing.py), rather than merged here by `merge`."""
        return self._reduce_templates is not None

    def reduce_text(self, outputs: Sequence[Any]) -> str:
        """The text a reduce step sends: a group of outputs of the level below, in order."""
        raise NotImplementedError(f"{self.name} has no reduce step")

    def render(self, text: str, mode: Mode, level: int = 0) -> Prompt:
        """The request for one chunk (level 0) or one reduce step (level > 0); the text is
        inserted, never formatted."""
        t = self._templates
        if level > 0:
            if self._reduce_templates is None:
                raise ValueError(f"{self.name} has no reduce step (level {level})")
            t = self._reduce_templates
        if mode == "chat":
            values = {**self._values, "text": text.strip()}
            messages = [
                {"role": "system", "content": t.system},
                {"role": "user", "content": prompts.fill(t.user, values)},
            ]
            return Prompt(
                messages=messages,
                response_format=self._response_format,
                max_tokens=self._chat_max_tokens,
            )
        if mode == "completion":
            body = self._completion_parts(text) if level > 0 else self._completion_chunk(text)
            values = {**self._values, "text": body}
            return Prompt(
                text=prompts.fill(t.completion, values),
                stop=list(t.stop) or None,
                max_tokens=t.completion_max_tokens,
            )
        raise ValueError(f"mode must be 'chat' or 'completion', got {mode!r}")

    def _completion_chunk(self, text: str) -> str:
        """The chunk as a completion prompt holds it: its whitespace collapsed to single spaces,
        since the worked examples are one line each and a base model continues what it sees."""
        return " ".join(text.split())

    def _completion_parts(self, text: str) -> str:
        """A reduce step's text as a completion prompt holds it (its `reduce_text`)."""
        return self._completion_chunk(text)

    def parse(self, raw: str, finish_reason: str | None) -> Any:
        """The chunk output, JSON-serializable.

        Raises:
            OutputParseError: the output cannot be used (it says when it was cut off).
        """
        try:
            return self._parse(raw)
        except OutputParseError as exc:
            if finish_reason == "length":
                raise OutputParseError(f"{exc} (the output was cut off at max_tokens)") from exc
            raise

    @abstractmethod
    def _parse(self, raw: str) -> Any: ...

    # A document some of whose chunks failed still gets the merge (or reduce) of the others,
    # marked partial with the failed chunks named; False: such a document gets an error.
    partial_answer: ClassVar[bool] = True

    @abstractmethod
    def merge(self, outputs: Sequence[Any]) -> Any:
        """One document's output from its chunks' outputs, in chunk order (at least one).

        A pipeline that `reduces` gets the one output its last reduce step left."""
