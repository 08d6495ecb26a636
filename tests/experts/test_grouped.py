import pytest
import torch

from megatron_emo.experts.grouped import grouped_mm, grouped_mm_reference

# Group sizes with an empty expert, a single row, and a large group.
GROUP_SIZES = [3, 0, 1, 12, 0, 5]


def _inputs(k, n, dtype, device="cpu"):
    sizes = torch.tensor(GROUP_SIZES, device=device)
    x = torch.randn(int(sizes.sum()), k, device=device).to(dtype)
    w = (torch.randn(len(GROUP_SIZES), k, n, device=device) / k**0.5).to(dtype)
    return x, w, sizes


def _explicit(x, w, sizes):
    out, start = [], 0
    for e, size in enumerate(sizes.tolist()):
        out.append(x[start : start + size].double() @ w[e].double())
        start += size
    return torch.cat(out)


def test_reference_matches_explicit_products():
    x, w, sizes = _inputs(16, 8, torch.float64)
    torch.testing.assert_close(grouped_mm_reference(x, w, sizes), _explicit(x, w, sizes))
    torch.testing.assert_close(grouped_mm(x, w, sizes), _explicit(x, w, sizes))


def test_empty_expert_gets_zero_weight_gradient():
    x, w, sizes = _inputs(8, 4, torch.float64)
    w.requires_grad_(True)
    grouped_mm(x, w, sizes).square().sum().backward()
    assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[4]) == 0
    assert torch.count_nonzero(w.grad[3]) > 0


@pytest.mark.gpu
def test_cuda_bf16_within_twice_the_bf16_error_of_pytorch():
    x, w, sizes = _inputs(256, 128, torch.bfloat16, device="cuda")
    exact = _explicit(x, w, sizes)
    ours = grouped_mm(x, w, sizes).double()
    pytorch_bf16 = torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(
        zip([0] + sizes.cumsum(0)[:-1].tolist(), sizes.cumsum(0).tolist()))]).double()
    floor = 1e-3
    assert (ours - exact).abs().max() <= 2 * (pytorch_bf16 - exact).abs().max() + floor


@pytest.mark.gpu
def test_cuda_rejects_fp32_instead_of_looping():
    x, w, sizes = _inputs(16, 8, torch.float32, device="cuda")
    with pytest.raises(NotImplementedError, match="bf16"):
        grouped_mm(x, w, sizes)
