"""Single-rank dispatch and combine (megatron_emo.kernels.permutation): rows in expert order, and back."""

import pytest
import torch

from megatron_emo.kernels.permutation import permute, tokens_per_expert, unpermute


def random_indices(num_tokens, num_experts, topk):
    """Distinct experts per token, as top-k gives."""
    return torch.rand(num_tokens, num_experts).topk(topk, dim=-1).indices


def expected_rows(tokens, indices, num_experts):
    """Loop version: for each expert in order, every (token, slot) choosing it, in token order."""
    rows = []
    for expert in range(num_experts):
        for token in range(indices.shape[0]):
            for slot in range(indices.shape[1]):
                if indices[token, slot] == expert:
                    rows.append(tokens[token])
    return torch.stack(rows) if rows else tokens.new_zeros(0, tokens.shape[1])


def test_tokens_per_expert():
    indices = torch.tensor([[0, 2], [2, 1], [2, 0]])
    assert tokens_per_expert(indices, 4).tolist() == [2, 1, 3, 0]
    assert tokens_per_expert(torch.zeros(0, 2, dtype=torch.int64), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("num_tokens,num_experts,topk", [(7, 5, 2), (16, 8, 3), (1, 4, 1), (9, 3, 3)])
def test_group_sizes(num_tokens, num_experts, topk):
    indices = random_indices(num_tokens, num_experts, topk)
    _, group_sizes, order = permute(torch.randn(num_tokens, 4), indices, num_experts)
    assert group_sizes.dtype == torch.int64 and group_sizes.shape == (num_experts,)
    assert int(group_sizes.sum()) == num_tokens * topk
    assert torch.equal(group_sizes, tokens_per_expert(indices, num_experts))
    assert torch.equal(group_sizes, torch.bincount(indices.flatten(), minlength=num_experts))
    assert sorted(order.tolist()) == list(range(num_tokens * topk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_sorted_by_expert_and_data_exact(dtype):
    tokens = torch.randn(11, 6).to(dtype)
    indices = random_indices(11, 5, 2)
    rows, group_sizes, order = permute(tokens, indices, 5)
    assert rows.dtype == dtype and rows.shape == (22, 6)
    experts_of_rows = indices.flatten()[order]
    assert bool((experts_of_rows[1:] >= experts_of_rows[:-1]).all())
    assert torch.equal(experts_of_rows, torch.repeat_interleave(torch.arange(5), group_sizes))
    # Stable: within an expert, rows follow token order.
    assert torch.equal(rows, expected_rows(tokens, indices, 5))
    assert torch.equal(rows, tokens[order // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_top1_unit_weights_is_identity(dtype):
    tokens = torch.randn(13, 5).to(dtype)
    indices = random_indices(13, 4, 1)
    rows, _, order = permute(tokens, indices, 4)
    out = unpermute(rows, torch.ones(13, 1), order)
    assert out.dtype == dtype
    assert torch.equal(out, tokens)


def test_roundtrip_topk_is_weighted_sum():
    tokens = torch.randn(10, 6)
    indices = random_indices(10, 7, 3)
    weights = torch.rand(10, 3)
    rows, _, order = permute(tokens, indices, 7)
    out = unpermute(rows, weights, order)
    torch.testing.assert_close(out, tokens * weights.sum(-1, keepdim=True))


def test_experts_applied_per_group_combine_to_the_right_tokens():
    """A different function per expert, applied on the sorted groups, lands on the right token."""
    tokens = torch.randn(9, 4)
    indices = random_indices(9, 5, 2)
    weights = torch.rand(9, 2)
    rows, group_sizes, order = permute(tokens, indices, 5)
    scale = torch.repeat_interleave(torch.arange(1.0, 6.0), group_sizes)  # expert e: x * (e + 1)
    out = unpermute(rows * scale[:, None], weights, order)
    expected = (weights * (indices + 1).float()).sum(-1, keepdim=True) * tokens
    torch.testing.assert_close(out, expected)


def test_expert_with_zero_tokens():
    indices = torch.tensor([[0, 2], [4, 2], [0, 4]])
    tokens = torch.randn(3, 3)
    rows, group_sizes, order = permute(tokens, indices, 5)
    assert group_sizes.tolist() == [2, 0, 2, 0, 2]
    assert torch.equal(rows, torch.stack([tokens[0], tokens[2], tokens[0], tokens[1], tokens[1], tokens[2]]))
    out = unpermute(rows, torch.full((3, 2), 0.5), order)
    torch.testing.assert_close(out, tokens)


def test_all_tokens_to_one_expert():
    tokens = torch.randn(8, 4)
    indices = torch.full((8, 1), 3)
    rows, group_sizes, order = permute(tokens, indices, 6)
    assert group_sizes.tolist() == [0, 0, 0, 8, 0, 0]
    assert torch.equal(order, torch.arange(8))
    assert torch.equal(rows, tokens)
    assert torch.equal(unpermute(rows, torch.ones(8, 1), order), tokens)


def test_unpermute_gradients():
    tokens = torch.randn(6, 3, requires_grad=True)
    indices = random_indices(6, 4, 2)
    weights = torch.rand(6, 2, requires_grad=True)
    rows, _, order = permute(tokens, indices, 4)
    out = unpermute(rows, weights, order)
    grad = torch.randn(6, 3)
    out.backward(grad)
    # out = x * (w1 + w2): d/dx = grad * (w1 + w2), d/dw_k = <grad, x>.
    torch.testing.assert_close(tokens.grad, grad * weights.detach().sum(-1, keepdim=True))
    torch.testing.assert_close(weights.grad, (grad * tokens.detach()).sum(-1, keepdim=True).expand(6, 2))


def test_no_tokens():
    rows, group_sizes, order = permute(torch.randn(0, 4), torch.zeros(0, 2, dtype=torch.int64), 3)
    assert rows.shape == (0, 4) and group_sizes.tolist() == [0, 0, 0] and order.numel() == 0
    assert unpermute(rows, torch.zeros(0, 2), order).shape == (0, 4)
