"""The plain-PyTorch router (megatron_emo.kernels.routing.reference.route) against the routing
contract."""

import pytest
import torch

from megatron_emo.kernels.routing.reference import pool_mask, route


def loop_reference(logits, segment_ids, pool_sizes):
    """The routing contract, one segment at a time: the pool mask and the masked logits.

    The pool of a segment is the top-P experts of the sum over its tokens of the unmasked
    softmax; ties go to the lower expert index.
    """
    logits = logits.double()
    num_tokens, num_experts = logits.shape
    mask = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    boundaries = [0] + [t for t in range(1, num_tokens) if segment_ids[t] != segment_ids[t - 1]]
    boundaries.append(num_tokens)
    for n, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:])):
        sums = torch.softmax(logits[start:end], dim=-1).sum(dim=0).tolist()
        ranked = sorted(range(num_experts), key=lambda e: (-sums[e], e))
        pool = ranked[: int(pool_sizes[n])]
        mask[start:end, pool] = True
    return mask, logits.masked_fill(~mask, float("-inf"))


def make_segments(lengths):
    """Contiguous segment ids with arbitrary (non-dense) values."""
    return torch.cat([torch.full((n,), 100 + 3 * i) for i, n in enumerate(lengths)])


def test_no_pool_is_plain_softmax_topk():
    logits = torch.randn(10, 8)
    weights, indices, probs = route(logits, None, None, 3)
    ref_probs = torch.softmax(logits, dim=-1)
    ref_weights, ref_indices = torch.topk(ref_probs, 3, dim=-1)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(probs, ref_probs)


def test_weights_are_not_renormalised():
    logits = torch.randn(12, 8)
    seg = make_segments([5, 7])
    weights, indices, probs = route(logits, seg, torch.tensor([4, 6]), 2)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    assert weights.shape == indices.shape == (12, 2)
    assert torch.equal(weights, probs.gather(1, indices))
    assert bool((weights.sum(-1) < 1 - 1e-4).all())
    # Descending, as top-k returns them.
    assert bool((weights[:, 0] >= weights[:, 1]).all())


def test_chosen_experts_lie_in_pool_with_exactly_p_eligible():
    lengths, pools = [3, 1, 6, 4], [3, 5, 4, 8]
    logits = torch.randn(sum(lengths), 10) * 3
    seg = make_segments(lengths)
    weights, indices, probs = route(logits, seg, torch.tensor(pools), 3)
    mask, _ = loop_reference(logits, seg, pools)
    token_pool = torch.repeat_interleave(torch.tensor(pools), torch.tensor(lengths))
    assert torch.equal((probs > 0).sum(-1), token_pool)
    assert bool((probs[~mask] == 0).all())
    assert bool(mask.gather(1, indices).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(seg)))


def test_pool_is_top_p_of_summed_softmax():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        num_experts = int(torch.randint(4, 17, (1,), generator=gen))
        topk = int(torch.randint(1, 4, (1,), generator=gen))
        lengths = torch.randint(1, 6, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
        pools = torch.randint(topk, num_experts + 1, lengths.shape, generator=gen)
        logits = torch.randn(int(lengths.sum()), num_experts, generator=gen) * 2
        seg = make_segments(lengths.tolist())
        weights, indices, probs, lse = route(logits, seg, pools, topk, return_logsumexp=True)
        mask, masked = loop_reference(logits, seg, pools)
        assert torch.equal(pool_mask(logits, seg, pools), mask), trial
        ref_probs = torch.softmax(masked, dim=-1).float()
        torch.testing.assert_close(probs, ref_probs)
        ref_weights, ref_indices = torch.topk(ref_probs, topk, dim=-1)
        assert torch.equal(indices, ref_indices), trial
        torch.testing.assert_close(weights, ref_weights)
        torch.testing.assert_close(lse, torch.logsumexp(masked, dim=-1).float())


def test_pool_uses_all_tokens_of_segment_not_each_token():
    """A segment's pool can exclude a token's own favourite expert."""
    # Token 0 strongly prefers expert 0; tokens 1..3 split between experts 1 and 2.
    logits = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.0],
            [0.0, 5.0, 5.0, 0.0],
            [0.0, 5.0, 5.0, 0.0],
            [0.0, 5.0, 5.0, 0.0],
        ]
    )
    seg = torch.zeros(4, dtype=torch.int64)
    weights, indices, probs = route(logits, seg, torch.tensor([2]), 1)
    assert (probs > 0).tolist() == [[False, True, True, False]] * 4
    assert indices[0].item() in (1, 2)
    # Per-token pools would have kept expert 0 for token 0.
    assert indices[0].item() != 0


def test_pool_at_least_num_experts_masks_nothing():
    logits = torch.randn(9, 6)
    seg = make_segments([4, 5])
    plain = route(logits, None, None, 2)
    for pools in ([6, 6], [7, 100]):
        pooled = route(logits, seg, torch.tensor(pools), 2)
        for a, b in zip(pooled, plain):
            assert torch.equal(a, b)


def test_single_token_segments():
    logits = torch.randn(7, 8) * 2
    seg = torch.arange(7)
    pool = 3
    weights, indices, probs = route(logits, seg, torch.full((7,), pool), 2)
    # Each token's pool is the top-P of its own logits.
    own_top = torch.topk(logits, pool, dim=-1).indices
    expected_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, own_top, True)
    assert torch.equal(probs > 0, expected_mask)
    ref_probs = torch.softmax(logits.masked_fill(~expected_mask, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, ref_probs)
    assert torch.equal(indices, torch.topk(logits, 2, dim=-1).indices)


@pytest.mark.parametrize("num_experts", [8, 127])
def test_tie_goes_to_lowest_index_experts(num_experts):
    # With many experts an unstable sort reorders ties, so 127 (EMO's routed count) checks that.
    logits = torch.zeros(5, num_experts)
    seg = make_segments([2, 3])
    pools = [3, num_experts // 2]
    weights, indices, probs = route(logits, seg, torch.tensor(pools), 2)
    for rows, pool in ((slice(0, 2), pools[0]), (slice(2, 5), pools[1])):
        eligible = torch.arange(num_experts) < pool
        assert torch.equal(probs[rows] > 0, eligible.expand_as(probs[rows]))
        torch.testing.assert_close(probs[rows][:, :pool], torch.full_like(probs[rows][:, :pool], 1 / pool))
        assert bool((indices[rows] < pool).all())


def test_partial_tie_goes_to_lowest_index():
    # Experts 1, 3 and 5 tie for the best sum; a pool of 2 takes experts 1 and 3.
    logits = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0, 2.0]] * 3)
    seg = torch.zeros(3, dtype=torch.int64)
    _, indices, probs = route(logits, seg, torch.tensor([2]), 1)
    assert (probs > 0)[0].tolist() == [False, True, False, True, False, False]


def test_return_logsumexp_is_logsumexp_of_masked_logits():
    logits = torch.randn(8, 6)
    seg = make_segments([3, 5])
    pools = torch.tensor([2, 4])
    *_, probs, lse = route(logits, seg, pools, 2, return_logsumexp=True)
    _, masked = loop_reference(logits, seg, pools)
    torch.testing.assert_close(lse, torch.logsumexp(masked, dim=-1).float())
    # Masking lowers it below the unmasked logsumexp.
    assert bool((lse < torch.logsumexp(logits, dim=-1)).all())
    # And it is consistent with the probabilities: probs = exp(masked logit - lse) in the pool.
    in_pool = probs > 0
    torch.testing.assert_close(probs[in_pool], torch.exp(logits - lse[:, None])[in_pool])


def test_return_logsumexp_without_pool():
    logits = torch.randn(5, 4)
    *_, lse = route(logits, None, None, 1, return_logsumexp=True)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1))


def test_extra_pool_sizes_are_ignored():
    logits = torch.randn(9, 8)
    seg = make_segments([2, 4, 3])
    exact = route(logits, seg, torch.tensor([3, 5, 4]), 2, return_logsumexp=True)
    for tail in ([0, 0, 0, 0, 0, 0], [1, 8, 2], [100]):
        longer = route(logits, seg, torch.tensor([3, 5, 4] + tail), 2, return_logsumexp=True)
        for a, b in zip(exact, longer):
            assert torch.equal(a, b)


def _separated_logits(num_tokens, num_experts, pool_experts, gen):
    """Logits whose pools are far from a tie (pool experts ~ +1, the rest ~ -4) and whose
    entries are well separated, so small perturbations change neither the pool nor the top-k."""
    base = torch.randperm(num_experts * num_tokens, generator=gen).double().view(num_tokens, num_experts)
    logits = base / (num_experts * num_tokens)  # distinct values in [0, 1)
    logits[:, pool_experts:] -= 5.0
    return logits


@pytest.mark.parametrize("with_pool", [True, False])
def test_gradients_match_gradcheck(with_pool):
    gen = torch.Generator().manual_seed(3)
    lengths, pools = [3, 2], torch.tensor([4, 4])
    logits = _separated_logits(5, 7, 4, gen).requires_grad_(True)
    seg = make_segments(lengths)

    def weights_of(x):
        if with_pool:
            weights, _, _ = route(x, seg, pools, 2)
        else:
            weights, _, _ = route(x, None, None, 2)
        return weights

    assert weights_of(logits).dtype == torch.float64  # fp64 stays fp64 for the check
    assert torch.autograd.gradcheck(weights_of, (logits,))


def test_no_gradient_outside_the_pool():
    gen = torch.Generator().manual_seed(4)
    logits = _separated_logits(6, 8, 5, gen).float().requires_grad_(True)
    seg = make_segments([2, 4])
    weights, indices, probs = route(logits, seg, torch.tensor([5, 5]), 2)
    (weights * torch.randn(weights.shape)).sum().backward()
    assert bool((logits.grad[:, 5:] == 0).all())
    assert bool((logits.grad[:, :5] != 0).any())


def test_gradients_match_float64_masked_softmax_autograd():
    """route's gradient = that of softmax over the pool (fixed) gathered at the top-k, in float64."""
    logits = (torch.randn(10, 8) * 2).requires_grad_(True)
    seg = make_segments([4, 1, 5])
    pools = torch.tensor([3, 4, 6])
    grad_out = torch.randn(10, 2)
    weights, indices, _ = route(logits, seg, pools, 2)
    (weights * grad_out).sum().backward()

    mask, _ = loop_reference(logits.detach(), seg, pools)
    x = logits.detach().double().requires_grad_(True)
    ref = torch.softmax(x.masked_fill(~mask, float("-inf")), dim=-1).gather(1, indices)
    (ref * grad_out.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), x.grad, atol=1e-6, rtol=1e-5)
