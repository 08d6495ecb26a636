"""Layouts: expert padding (which layouts can run: tests/test_validate.py)."""

import pytest

from megatron_emo.parallel.layout import ExpertLayout


@pytest.mark.parametrize("ep_size, padded, local", [(1, 127, 127), (2, 128, 64), (8, 128, 16), (128, 128, 1)])
def test_127_experts_pad_to_a_multiple_of_ep(ep_size, padded, local):
    layouts = [ExpertLayout(127, ep_size, rank) for rank in range(ep_size)]
    assert {(layout.num_padded, layout.num_local) for layout in layouts} == {(padded, local)}
    # The ranks' experts tile [0, padded) in order.
    assert [layout.first_local for layout in layouts] == list(range(0, padded, local))
