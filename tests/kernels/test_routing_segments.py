"""Segment starts and ordinals (megatron_emo.kernels.routing.segments)."""

import torch

from megatron_emo.kernels.routing.segments import segment_ordinals, segment_starts

EOS = 2


def test_segment_starts_where_the_id_changes():
    ids = torch.tensor([7, 7, 3, 3, 3, 9, 7])
    assert segment_starts(ids).tolist() == [True, False, True, False, False, True, True]


def test_segment_starts_at_every_row_start():
    ids = torch.tensor([[5, 5, 7], [7, 7, 9]])
    assert segment_starts(ids).tolist() == [[True, False, True], [True, False, True]]


def test_segment_ordinals_of_segment_ids():
    ids = torch.tensor([7, 7, 3, 3, 3, 9, 7])
    assert segment_ordinals(segment_starts(ids)).tolist() == [0, 0, 1, 1, 1, 2, 3]


def test_segment_ordinals_flattened_rows_stay_apart():
    ids = torch.tensor([[5, 5, 7], [7, 7, 9], [9, 9, 9]])
    assert segment_ordinals(segment_starts(ids).flatten()).tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 4]


def test_segment_ordinals_dtype():
    starts = torch.tensor([True, False, True])
    assert segment_ordinals(starts).dtype == torch.int64
    assert segment_ordinals(starts, dtype=torch.int32).dtype == torch.int32


def test_segment_ordinals_empty():
    assert segment_ordinals(segment_starts(torch.zeros(0, dtype=torch.int64))).shape == (0,)


# EOS flags, as megatron_emo.routing.documents numbers the segments of a row.


def test_segment_ordinals_eos_at_start_is_not_a_boundary():
    ids = torch.tensor([[EOS, 5, 6, 7]])
    assert segment_ordinals(ids == EOS).tolist() == [[0, 0, 0, 0]]


def test_segment_ordinals_eos_starts_its_segment():
    ids = torch.tensor([[5, 6, EOS, 7, 8]])
    # The EOS at position 2 belongs to the segment it starts, not to the one it ends.
    assert segment_ordinals(ids == EOS).tolist() == [[0, 0, 1, 1, 1]]


def test_segment_ordinals_consecutive_eos_give_single_token_segments():
    ids = torch.tensor([[5, EOS, EOS, EOS, 9]])
    assert segment_ordinals(ids == EOS).tolist() == [[0, 1, 2, 3, 3]]


def test_segment_ordinals_row_without_eos_is_one_segment_and_rows_are_independent():
    ids = torch.tensor([[5, 6, 7, 8], [EOS, 3, EOS, 4], [1, 1, 1, EOS]])
    assert segment_ordinals(ids == EOS).tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]


def test_segment_ordinals_does_not_modify_input():
    starts = torch.tensor([[True, False, True, False]])
    before = starts.clone()
    segment_ordinals(starts)
    assert torch.equal(starts, before)
