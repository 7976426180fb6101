"""How much text one call may carry: chunks and reduce groups sized to the model's context.

A call holds the pipeline's prompt, the text and the answer (up to its output cap) within the
model's context window (`Settings.context_tokens`). Our token counts come from tiktoken, not the
model's own tokenizer, so a tenth of the window is kept in reserve. `DOCQ_CHUNK_TOKENS`
overrides the chunk size; reduce groups are always sized from the context.
"""

from __future__ import annotations

from docqueue.workers.batch.calls import prompt_tokens
from docqueue.workers.errors import PipelineError
from docqueue.workers.ingest.chunking import MIN_CHUNK_TOKENS
from docqueue.workers.pipelines import Pipeline, Prompt
from docqueue.workers.settings import Settings

RESERVE_SHARE = 10  # one tenth of the window: tokenizers differ, chat framing varies


def output_cap(settings: Settings, prompt: Prompt) -> int:
    """The answer's cap as the batch sends it (`max_tokens`)."""
    return min(prompt.max_tokens or settings.llm_max_tokens, settings.llm_max_tokens)


def room_for_text(settings: Settings, pipeline: Pipeline, level: int = 0) -> int:
    """Tokens of text one call of `pipeline` at `level` may carry in the model's context."""
    window = settings.context_tokens
    empty = pipeline.render("", settings.mode, level)
    return (window - prompt_tokens(empty) - output_cap(settings, empty)
            - window // RESERVE_SHARE)


def chunk_tokens(settings: Settings, pipeline: Pipeline) -> int:
    """The chunk size for a job: DOCQ_CHUNK_TOKENS, else as large as the context allows.

    Raises:
        PipelineError: the context leaves too little room for text (and its overlap).
    """
    if settings.chunk_tokens is not None:
        return settings.chunk_tokens
    room = room_for_text(settings, pipeline)
    if room < max(MIN_CHUNK_TOKENS, 2 * settings.chunk_overlap_tokens + 1):
        raise PipelineError(
            f"a context of {settings.context_tokens} tokens (DOCQ_LLM_CONTEXT_TOKENS or the "
            f"model's known window) leaves {room} tokens for text after the {pipeline.name} "
            "prompt and its output cap; raise it or set DOCQ_CHUNK_TOKENS"
        )
    return room


def reduce_group_tokens(settings: Settings, pipeline: Pipeline) -> int:
    """Tokens of outputs one reduce step may take: at least two outputs at their cap, so
    every level has fewer steps than the one below it.

    Raises:
        PipelineError: the context cannot hold two outputs of the level below.
    """
    room = room_for_text(settings, pipeline, level=1)
    cap = output_cap(settings, pipeline.render("", settings.mode, 1))
    if room < 2 * (cap + 1):
        raise PipelineError(
            f"a context of {settings.context_tokens} tokens leaves {room} tokens for a "
            f"{pipeline.name} reduce step, less than two answers of up to {cap} tokens; raise "
            "DOCQ_LLM_CONTEXT_TOKENS or lower DOCQ_LLM_MAX_TOKENS"
        )
    return room
