"""Router losses (megatron_emo.routing.balance): Switch load balancing with global counts, z-loss."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_emo.routing.balance import load_balancing_loss, z_loss
from megatron_emo.testing.distributed import run_distributed


def test_load_balancing_loss_by_hand_top1():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    indices = torch.tensor([[0], [1]])
    loss, counts = load_balancing_loss(probs, indices)
    # fractions (1/2, 1/2, 0), mean probs (0.45, 0.35, 0.2): (3 / 1) * (0.225 + 0.175) = 1.2
    assert loss.item() == pytest.approx(1.2, rel=1e-6)
    assert counts.dtype == torch.float32 and counts.tolist() == [1.0, 1.0, 0.0]


def test_load_balancing_loss_by_hand_top2():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.3, 0.4, 0.2, 0.1]])
    indices = torch.tensor([[0, 1], [1, 0]])
    loss, counts = load_balancing_loss(probs, indices)
    # counts (2, 2, 0, 0) over T=2 tokens: fractions (1, 1, 0, 0); mean probs (0.4, 0.35, ...):
    # (4 / 2) * (0.4 + 0.35) = 1.5
    assert loss.item() == pytest.approx(1.5, rel=1e-6)
    assert counts.tolist() == [2.0, 2.0, 0.0, 0.0]


def test_load_balancing_loss_perfect_balance_is_one():
    probs = torch.full((4, 4), 0.25)
    indices = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    loss, _ = load_balancing_loss(probs, indices)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_load_balancing_loss_collapse_is_e_over_k():
    # Every token on expert 0 with probability 1: (E / K) * 1 * 1 = 5.
    probs = torch.zeros(3, 5)
    probs[:, 0] = 1.0
    loss, _ = load_balancing_loss(probs, torch.zeros(3, 1, dtype=torch.int64))
    assert loss.item() == pytest.approx(5.0)


def test_load_balancing_loss_gradient_is_through_probs_only():
    probs = torch.softmax(torch.randn(6, 5), dim=-1).requires_grad_(True)
    indices = torch.topk(probs, 2, dim=-1).indices
    loss, counts = load_balancing_loss(probs, indices)
    loss.backward()
    # dL/dprobs[t, i] = (E / K) * (C_i / T) / T, the same for every token.
    expected = (5 / 2) * (counts / 6) / 6
    torch.testing.assert_close(probs.grad, expected.expand(6, 5))


def test_z_loss_by_hand():
    lse = torch.tensor([1.0, 2.0, -3.0])
    assert z_loss(lse).item() == pytest.approx(14 / 3)


def test_z_loss_of_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4.
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss(torch.logsumexp(logits, dim=-1)).item() == pytest.approx(expected, rel=1e-6)


# --- global load balancing over two ranks ---------------------------------------------------------


def _batch(num_tokens=8, hidden=5, num_experts=6, topk=2):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(num_tokens, hidden, generator=gen)
    weight = torch.randn(hidden, num_experts, generator=gen)
    return x, weight, topk


def _losses(x, weight, topk, group=None):
    """LB loss of the tokens ``x``; gradients w.r.t. the probabilities and the router weight."""
    weight = weight.clone().requires_grad_(True)
    probs = torch.softmax(x @ weight, dim=-1)
    probs.retain_grad()
    indices = torch.topk(probs, topk, dim=-1).indices
    loss, _ = load_balancing_loss(probs, indices, group=group)
    loss.backward()
    return loss.detach(), probs.grad, weight.grad


def _half_batch_rank(rank, world_size):
    x, weight, topk = _batch()
    half = x.shape[0] // world_size
    return _losses(x[rank * half : (rank + 1) * half], weight, topk, group=dist.group.WORLD)


def test_global_load_balancing_two_ranks_equals_whole_batch():
    results = run_distributed(_half_batch_rank, 2)
    x, weight, topk = _batch()
    loss, probs_grad, weight_grad = _losses(x, weight, topk)

    # Counts differ between the halves, so the test would notice purely local counts.
    half = x.shape[0] // 2
    local = [_losses(x[r * half : (r + 1) * half], weight, topk)[0] for r in range(2)]
    assert not torch.allclose((local[0] + local[1]) / 2, loss)

    rank_losses = torch.stack([r[0] for r in results])
    torch.testing.assert_close(rank_losses.mean(), loss)
    # Data-parallel gradient averaging: the mean over ranks of each rank's gradient.
    torch.testing.assert_close(torch.cat([r[1] for r in results]) / 2, probs_grad)
    torch.testing.assert_close((results[0][2] + results[1][2]) / 2, weight_grad)
