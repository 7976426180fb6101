"""A job's status in words for people: chunk counts by state, never a Python dict."""

from __future__ import annotations

from typing import Any

from docqueue.tasks.progress import chunks_in_words


def status(total: int, by_state: dict[str, int], retrying: int = 0) -> dict[str, Any]:
    return {"chunks_total": total, "chunks_done": sum(by_state.values()),
            "chunks_by_state": by_state, "chunks_retrying": retrying}


def test_finished_counts_read_in_words_in_a_fixed_order() -> None:
    # Given a job with ok, failed and budget-skipped chunks
    st = status(1_165, {"skipped_budget": 2, "error": 3, "ok": 1_160})
    # When it is put in words / Then ok comes first and errors read "failed"
    assert chunks_in_words(st) == "1,160 ok, 3 failed, 2 skipped (budget spent)"


def test_unfinished_counts_say_what_is_retrying_and_waiting() -> None:
    assert chunks_in_words(status(10, {"ok": 4}, retrying=1)) == "4 ok, 1 retrying, 5 waiting"
    assert chunks_in_words(status(0, {})) == "no chunks"
