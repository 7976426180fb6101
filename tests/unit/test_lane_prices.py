"""Prices per lane and service tier: the batch lane and flex cost the batch entry, else half."""

from __future__ import annotations

import pytest

from docqueue.workers.settings import Price


def test_the_batch_lane_and_flex_cost_half_unless_the_table_says_otherwise() -> None:
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    assert price.rates() == price.rates("online", "default") == (2.0, 8.0)
    assert price.rates("online", "auto") == (2.0, 8.0)
    assert price.rates("batch") == price.rates("online", "flex") == (1.0, 4.0)
    assert price.cost(1_000_000, 500_000, "batch") == pytest.approx(3.0)
    listed = Price(input_per_mtok=2.0, output_per_mtok=8.0, batch_input_per_mtok=0.5,
                   batch_output_per_mtok=3.0)
    assert listed.rates("batch") == (0.5, 3.0)
    assert listed.cost(1_000_000, 1_000_000, "online", "flex") == pytest.approx(3.5)
