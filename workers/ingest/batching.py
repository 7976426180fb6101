"""Grouping a stream of chunks into batches by a maximum count and a maximum token budget.

`Batcher` is the core: the producer reads documents one at a time, writes each document's row,
then feeds its chunks to `add()`, which hands back a batch whenever one is complete; `flush()`
returns the last, partial one. `batched()` wraps the same logic as a generator for pipelines
that are a single stream of items. Either way only the open batch is held in memory.

A batch never holds more than `max_items` items, and never more than `max_tokens` tokens unless
it is a single item that is over the budget on its own: that item gets a batch of its own.
`max_items` may change between batches: `BatchSizes` says how many chunks each batch of a job
takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items in order into batches of at most `max_items` items and `max_tokens` tokens.

    Raises:
        ValueError: a limit below 1, or (from `add`) an item with a negative token count.
    """

    def __init__(self, *, max_items: int, max_tokens: int, tokens: Callable[[T], int]) -> None:
        if max_items < 1 or max_tokens < 1:
            raise ValueError(
                f"max_items and max_tokens must be at least 1, got {max_items} and {max_tokens}"
            )
        self.max_items = max_items
        self.max_tokens = max_tokens
        self._tokens = tokens
        self._items: list[T] = []
        self._total = 0

    @property
    def pending(self) -> int:
        """How many items wait in the open batch."""
        return len(self._items)

    def add(self, item: T) -> list[T] | None:
        """Add an item; returns the batch it closed, if adding it closed one."""
        count = self._tokens(item)
        if count < 0:
            raise ValueError(f"an item cannot have a negative token count ({count})")
        closed = None
        if self._items and (
            len(self._items) == self.max_items or self._total + count > self.max_tokens
        ):
            closed = self.flush()
        self._items.append(item)
        self._total += count
        return closed

    def flush(self) -> list[T] | None:
        """Close the open batch and return it (None when it is empty)."""
        if not self._items:
            return None
        batch, self._items, self._total = self._items, [], 0
        return batch


@dataclass(frozen=True)
class BatchSizes:
    """How many chunks each batch of a job takes, from where it sits in the job.

    A batch costs the same to deliver whatever its size (its message, its claim, its story),
    so batches hold `most` chunks in the middle of a job. The first ones are smaller, doubling
    from `least`: the first claims are quick and every process has work at once. Over the
    job's last chunks, once the producer knows how many are left, a batch takes a `slots`th of
    what remains, down to `least` (guided self-scheduling; `slots`: batches the workers present
    run at once): the open batches end about together, no worker keeps a straggler, and what
    the open batches hold stays about all that remains (a thread holds its batch until the
    batch's last call ends, so smaller shares would leave in-flight slots empty before the
    end).
    `least >= most` gives every batch `most` chunks.
    """

    most: int
    least: int
    slots: int

    @property
    def tail(self) -> int:
        """Chunks from the end over which batches shrink below `most`: the producer keeps this
        many unnumbered until it knows where the job ends."""
        return self.slots * self.most if self.least < self.most else 0

    def size(self, index: int, remaining: int | None = None) -> int:
        """Chunks for the job's batch number `index` (from 0), with `remaining` chunks left to
        place counting this batch's (None: not known yet, the job goes on past the tail)."""
        least = min(self.least, self.most)
        size = min(self.most, least << min(index, 32))
        if remaining is not None:
            size = min(size, max(least, -(-remaining // self.slots)))
        return size


def batched(
    items: Iterable[T], *, max_items: int, max_tokens: int, tokens: Callable[[T], int]
) -> Iterator[list[T]]:
    """Yield the batches of `items`, in order, as `Batcher` forms them."""
    batcher = Batcher(max_items=max_items, max_tokens=max_tokens, tokens=tokens)
    for item in items:
        if (batch := batcher.add(item)) is not None:
            yield batch
    if (batch := batcher.flush()) is not None:
        yield batch
