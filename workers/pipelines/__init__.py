"""Pipelines: what a job asks of the model for each chunk, and how a document's answers merge.

`build_pipeline(name, options)` is the one way in; the contract is in `base.py`, the shipped
pipelines in `builtin.py`, the OpenAI Batch file replay in `openai_batch.py`, the prompt
templates in `prompts.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from docqueue.workers.errors import PipelineError
from docqueue.workers.pipelines.base import Mode, OutputParseError, Pipeline, Prompt
from docqueue.workers.pipelines.builtin import Classify, Custom, Extract, Summarize
from docqueue.workers.pipelines.openai_batch import OpenAIBatchPipeline

__all__ = [
    "PIPELINE_NAMES", "Mode", "OutputParseError", "Pipeline", "Prompt", "build_pipeline",
]


_PIPELINES: dict[str, Callable[[Mapping[str, Any]], Pipeline]] = {
    **{p.name: p for p in (Summarize, Classify, Extract, Custom)},
    "openai-batch": OpenAIBatchPipeline,
}
PIPELINE_NAMES: tuple[str, ...] = tuple(_PIPELINES)


def build_pipeline(name: str, options: Mapping[str, Any]) -> Pipeline:
    """The pipeline `name` with its options checked.

    Raises:
        PipelineError: an unknown name, or options the pipeline cannot work with.
    """
    if name not in _PIPELINES:
        raise PipelineError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINE_NAMES)}")
    if not isinstance(options, Mapping):
        raise PipelineError(f"{name}: options must be a JSON object, got {type(options).__name__}")
    return _PIPELINES[name](options)
