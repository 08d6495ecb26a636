"""The device-side multi-tensor stand-ins equal what they replace."""

import pytest
import torch

from megatron_emo.training import multi_tensor


def _tensors(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(device) for shape in ((3, 5), (7,), (2, 2, 2))]


def test_l2_norm_is_the_norm_of_all_tensors_together():
    tensors = _tensors()
    norm, per_tensor = multi_tensor.l2_norm(2048, None, [tensors], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm[0], torch.cat([t.flatten() for t in tensors]).norm())


def test_scale_in_place_and_into_other_tensors():
    tensors = _tensors()
    expected = [t * 0.5 for t in tensors]
    multi_tensor.scale(2048, None, [tensors, tensors], 0.5)
    for actual, wanted in zip(tensors, expected):
        torch.testing.assert_close(actual, wanted)
    targets = [torch.empty_like(t) for t in tensors]
    multi_tensor.scale(2048, None, [tensors, targets], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(tensors, targets))
    multi_tensor.scale(2048, None, [tensors, targets], 3.0)
    assert all(torch.equal(a * 3.0, b) for a, b in zip(tensors, targets))


@pytest.mark.gpu
def test_the_stand_ins_match_megatron_cores_fallbacks_on_gpu():
    from megatron.core import utils

    tensors = _tensors("cuda")
    ours, _ = multi_tensor.l2_norm(2048, None, [tensors], False)
    theirs, _ = utils.local_multi_tensor_l2_norm(2048, None, [tensors], False)
    torch.testing.assert_close(ours, theirs)
    targets, expected = [torch.empty_like(t) for t in tensors], [torch.empty_like(t) for t in tensors]
    multi_tensor.scale(2048, None, [tensors, targets], 0.25)
    utils.local_multi_tensor_scale(2048, None, [tensors, expected], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(targets, expected))
