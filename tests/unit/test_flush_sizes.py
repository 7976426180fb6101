"""When the streaming producer commits (and so publishes) what it has read: small first."""

from __future__ import annotations

from docqueue.workers.jobs.submission import FlushSizes, held_tail


def test_the_first_flush_is_one_small_batch_and_each_next_doubles_up_to_the_most() -> None:
    # Given flushes from 16 chunks up to 5,000
    flushes = FlushSizes(first=16, most=5000, every_s=100.0, now=0.0)
    # Then the first is due at 16 chunks, not before
    assert not flushes.due(15, now=0.01)
    assert flushes.due(16, now=0.01)
    # And each flush doubles the next one's size, up to the most and no further
    limits = []
    for _ in range(12):
        limits.append(flushes.limit)
        flushes.flushed(now=0.0)
    assert limits[:4] == [16, 32, 64, 128]
    assert limits[-1] == 5000 and max(limits) == 5000
    assert not flushes.due(4999, now=0.0) and flushes.due(5000, now=0.0)


def test_a_slow_source_is_flushed_every_interval_once_a_chunk_waits() -> None:
    # Given flushes every 0.3 s, the last at t=10
    flushes = FlushSizes(first=1000, most=5000, every_s=0.3, now=10.0)
    # Then a few chunks wait until the interval has passed, and nothing is flushed empty
    assert not flushes.due(3, now=10.2)
    assert flushes.due(3, now=10.3)
    assert not flushes.due(0, now=99.0)
    # And the interval counts from the last flush
    flushes.flushed(now=10.3)
    assert not flushes.due(3, now=10.5) and flushes.due(3, now=10.61)


def test_the_tail_is_held_whole_for_a_quick_read_and_released_by_half_for_a_long_one() -> None:
    # Given a tail of 3,200 chunks
    # Then a corpus read within the wait keeps the whole tail back (its last batches shrink)
    assert held_tail(3200, 300, elapsed_s=0.1) == 3200
    # And past it, half of what was read goes out, until twice the tail is read
    assert held_tail(3200, 1000, elapsed_s=0.5) == 500
    assert held_tail(3200, 6400, elapsed_s=0.5) == 3200
    assert held_tail(3200, 10**6, elapsed_s=30.0) == 3200
    assert held_tail(0, 500, elapsed_s=5.0) == 0
