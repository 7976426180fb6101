"""Grouping chunks into batches by count and token budget, streaming."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from docqueue.workers.ingest.batching import Batcher, batched


def test_batches_respect_both_limits_and_keep_order() -> None:
    # Given items whose value is their token count
    items = [30, 30, 30, 10, 10, 10, 10, 10, 50, 5]
    # When they are batched by at most 4 items and 70 tokens
    batches = list(batched(items, max_items=4, max_tokens=70, tokens=lambda t: t))
    # Then no batch breaks a limit, and together they are the items in order
    assert batches == [[30, 30], [30, 10, 10, 10], [10, 10, 50], [5]]
    assert all(len(b) <= 4 and sum(b) <= 70 for b in batches)
    assert list(itertools.chain.from_iterable(batches)) == items


def test_an_item_over_the_budget_gets_a_batch_of_its_own() -> None:
    # Given an oversized item at the start, in the middle and at the end
    items = [500, 10, 10, 900, 10, 700]
    # When they are batched with a budget of 100 tokens
    batches = list(batched(items, max_items=10, max_tokens=100, tokens=lambda t: t))
    # Then each oversized item travels alone and the others are grouped around it
    assert batches == [[500], [10, 10], [900], [10], [700]]


def test_a_batch_may_hold_exactly_the_budget() -> None:
    # Given items that add up to exactly the budget, then one more
    # When they are batched / Then the first batch is full to the token and the next starts
    batches = list(batched([40, 60, 1], max_items=10, max_tokens=100, tokens=lambda t: t))
    assert batches == [[40, 60], [1]]


def test_no_items_make_no_batches() -> None:
    assert list(batched([], max_items=3, max_tokens=10, tokens=lambda t: t)) == []


def test_batches_stream_from_an_endless_source() -> None:
    # Given an endless stream of items
    def endless() -> Iterator[int]:
        yield from itertools.count()

    # When the first batches are taken
    first = list(itertools.islice(batched(endless(), max_items=3, max_tokens=10**9, tokens=int), 2))
    # Then they come without the stream being exhausted
    assert first == [[0, 1, 2], [3, 4, 5]]


def test_batcher_hands_back_closed_batches_and_flushes_the_rest() -> None:
    # Given a batcher of at most 2 items, fed records with a token field
    batcher: Batcher[dict[str, int]] = Batcher(
        max_items=2, max_tokens=1_000, tokens=lambda c: c["tokens"]
    )
    a, b, c = {"tokens": 5}, {"tokens": 6}, {"tokens": 7}
    # When items are added one at a time
    assert batcher.add(a) is None
    assert batcher.add(b) is None
    closed = batcher.add(c)
    # Then adding the third closes the first two, and flush returns the rest once
    assert closed == [a, b]
    assert batcher.pending == 1
    assert batcher.flush() == [c]
    assert batcher.flush() is None


@pytest.mark.parametrize(("max_items", "max_tokens"), [(0, 10), (5, 0)])
def test_limits_below_one_are_refused(max_items: int, max_tokens: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(max_items=max_items, max_tokens=max_tokens, tokens=int)


def test_a_negative_token_count_is_refused() -> None:
    batcher: Batcher[int] = Batcher(max_items=5, max_tokens=10, tokens=lambda t: t)
    with pytest.raises(ValueError, match="negative token count"):
        batcher.add(-1)
