"""The provider's prompt cache, as docqueue plans for it: which prompt tokens will be billed
at the cached rate.

OpenAI caches a prompt of at least `MIN_CACHED_TOKENS` tokens in steps of `CACHE_STEP_TOKENS`:
a call whose leading tokens an earlier call (routed alike, `prompt_cache_key`) already sent has
the largest such multiple of them read from the cache. Every chunk of a job has the same
leading tokens when its prompt puts what is the same for every chunk (the instructions, the
schema, the labels) first and the chunk last, as the builtin pipelines do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from docqueue.workers.pipelines import Pipeline, Prompt
from docqueue.workers.pipelines.base import Mode
from docqueue.workers.tokens import encoding

MIN_CACHED_TOKENS = 1024
CACHE_STEP_TOKENS = 128
# A chat message's framing (calls.prompt_tokens counts 4 tokens a message and 3 to prime the
# reply): the same for every call, so any id that no text has stands for it.
_FRAMING = (-1, -1, -1, -1)
# Two chunks that differ from their first character: what their prompts share is the pipeline's.
_PROBES = ("alpha", "omega")


def cache_key(job_id: int, pipeline: str) -> str:
    """The prompt_cache_key of a job's calls: one per job and pipeline."""
    return f"docq-{job_id}-{pipeline}"


def usage_cached_tokens(usage: Mapping[str, Any]) -> int:
    """The prompt tokens read from the provider's cache, in an OpenAI response's raw usage
    (`prompt_tokens_details.cached_tokens`; absent: none)."""
    details = usage.get("prompt_tokens_details")
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


def cacheable(prefix_tokens: int) -> int:
    """Of a prefix that earlier calls sent, the tokens the provider reads from its cache."""
    cached = prefix_tokens - prefix_tokens % CACHE_STEP_TOKENS
    return cached if cached >= MIN_CACHED_TOKENS else 0


def token_ids(prompt: Prompt) -> list[int]:
    """The prompt as the token sequence the provider's cache compares (framing stood in for)."""
    if prompt.text is not None:
        return list(encoding().encode_ordinary(prompt.text))
    ids: list[int] = []
    for message in prompt.messages or []:
        ids += [*_FRAMING, *encoding().encode_ordinary(message["content"])]
    return ids


def shared_prefix_tokens(pipeline: Pipeline, mode: Mode, level: int = 0) -> int:
    """How many leading tokens every prompt of `pipeline` has in common, whatever the chunk."""
    first, second = (token_ids(pipeline.render(probe, mode, level)) for probe in _PROBES)
    shared = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        shared += 1
    return shared
