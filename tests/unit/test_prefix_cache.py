"""The simulator's prompt cache: which prompt tokens a request finds cached, and its memory."""

from __future__ import annotations

import pytest

from docqueue.workers.testing.simulator.prefix_cache import PrefixCache
from docqueue.workers.testing.simulator.protocol import parse
from docqueue.workers.testing.simulator.tokens import count_messages, messages_ids


def prompt(shared: int, tail: int, *, start: int = 0, tail_id: int = 900_000) -> list[int]:
    """`shared` tokens every such prompt has (from `start`), then `tail` tokens of its own."""
    return list(range(start, start + shared)) + list(range(tail_id, tail_id + tail))


def test_the_first_request_misses_and_a_later_one_finds_the_largest_128_multiple() -> None:
    # Given an empty cache and prompts sharing their first 1,500 tokens
    cache = PrefixCache()
    # When the first is sent / Then nothing is cached yet
    assert cache.read_and_store("m\0k", prompt(1500, 300, tail_id=10**6)) == 0
    # When another follows with another tail / Then 1,408 = 11 x 128 of the 1,500 are found
    assert cache.read_and_store("m\0k", prompt(1500, 40, tail_id=2 * 10**6)) == 1408
    # and a third repeating the second whole finds all its full blocks: 1,540 -> 1,536
    assert cache.read_and_store("m\0k", prompt(1500, 40, tail_id=2 * 10**6)) == 1536


@pytest.mark.parametrize(("shared", "found"), [
    (1023, 0),      # 896 tokens of whole blocks in common: under the 1,024 minimum
    (1024, 1024),   # exactly the minimum
    (1100, 1024),   # the partial block after 1,024 is not cached
    (1151, 1024),
    (1152, 1152),
    (4000, 3968),
])
def test_what_is_found_is_a_multiple_of_128_of_at_least_1024(shared: int, found: int) -> None:
    cache = PrefixCache()
    cache.read_and_store("b", prompt(shared, 200, tail_id=10**6))
    assert cache.read_and_store("b", prompt(shared, 200, tail_id=2 * 10**6)) == found


def test_a_prompt_under_1024_tokens_is_neither_cached_nor_found() -> None:
    # Given a prompt of 1,000 tokens sent twice
    cache = PrefixCache()
    assert cache.read_and_store("b", prompt(1000, 0)) == 0
    assert cache.read_and_store("b", prompt(1000, 0)) == 0
    # Then the cache holds nothing for it
    assert len(cache) == 0


def test_the_prefix_must_start_at_the_first_token() -> None:
    # Given two prompts that differ only in their first token
    cache = PrefixCache()
    cache.read_and_store("b", [7, *range(1, 2000)])
    # Then nothing of the second is found: a cached prefix is a prompt's beginning
    assert cache.read_and_store("b", [8, *range(1, 2000)]) == 0


def test_another_bucket_another_cache_key_or_model_finds_nothing() -> None:
    cache = PrefixCache()
    cache.read_and_store("gpt-4.1\0docq-1-custom", prompt(1500, 10))
    assert cache.read_and_store("gpt-4.1\0docq-2-custom", prompt(1500, 10)) == 0
    assert cache.read_and_store("gpt-4o\0docq-1-custom", prompt(1500, 10)) == 0
    assert cache.read_and_store("gpt-4.1\0docq-1-custom", prompt(1500, 10)) == 1408


def test_memory_is_bounded_and_the_least_recently_used_prefix_goes_first() -> None:
    # Given a cache of 16 blocks, filled by two prompts of 8 full blocks (1,024 tokens) each
    cache = PrefixCache(capacity=16)
    first, second = prompt(1024, 0, start=0), prompt(1024, 0, start=50_000)
    cache.read_and_store("b", first)
    cache.read_and_store("b", second)
    assert cache.read_and_store("b", first) == 1024  # used again: now the most recent
    # When a third prompt needs 8 more blocks than are free
    cache.read_and_store("b", prompt(1024, 0, start=100_000))
    # Then the cache stays within its 16 blocks, having forgotten the least recently used
    assert len(cache) == 16
    assert cache.read_and_store("b", first) == 1024
    assert cache.read_and_store("b", second) == 0
    # And a cache of no blocks never finds anything
    off = PrefixCache(capacity=0)
    off.read_and_store("b", first)
    assert off.read_and_store("b", first) == 0 and len(off) == 0


def test_a_chat_request_is_compared_as_a_sequence_as_long_as_its_prompt_tokens() -> None:
    # Given a chat request with a long system message and a short user message
    instructions = "Follow every rule below with care. " * 200
    messages = [{"role": "system", "content": instructions},
                {"role": "user", "content": "the chunk", "name": "reader"}]
    req = parse({"model": "docq-sim", "messages": messages, "prompt_cache_key": "docq-7-x"},
                "chat")
    # Then its token sequence is as long as its billed prompt, and the key is read
    [ids] = req.prompt_sequences()
    assert len(ids) == count_messages(messages) == req.prompt_tokens[0]
    assert ids == messages_ids(messages) and req.prompt_cache_key == "docq-7-x"
    # and two requests that differ only in the user message share the system message's tokens
    other = parse({"model": "docq-sim", "messages": [
        messages[0], {"role": "user", "content": "another chunk"}]}, "chat").prompt_sequences()[0]
    shared = next(i for i, (a, b) in enumerate(zip(ids, other, strict=False)) if a != b)
    assert shared > len(ids) - 10
