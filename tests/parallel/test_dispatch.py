"""Expert-parallel dispatch and combine over 2 gloo ranks: uneven splits, empty experts, autograd."""

import torch

from megatron_emo.testing.distributed import run_distributed

# Rows per global expert sent by each rank (4 experts, 2 per rank): uneven, with empty experts.
COUNTS = {0: [3, 0, 2, 1], 1: [0, 0, 4, 2]}


def _rows(rank):
    """Rank r's rows sorted by expert, each tagged (rank, expert, index) in its 3 columns."""
    return torch.tensor([[rank, expert, i] for expert, n in enumerate(COUNTS[rank]) for i in range(n)],
                        dtype=torch.float64)


def _exchange(rank, world_size):
    import torch.distributed as dist

    from megatron_emo.parallel.dispatch import combine, dispatch
    from megatron_emo.training.cpu_mode import cuda_on_cpu

    with cuda_on_cpu():
        rows = _rows(rank).requires_grad_()
        local, local_sizes, plan = dispatch(rows, torch.tensor(COUNTS[rank]), dist.group.WORLD)
        back = combine(local * 2, plan)
        back.sum().backward()
        return local.detach(), local_sizes, back.detach(), rows.grad


def test_rows_reach_their_experts_grouped_and_come_back_in_order():
    results = run_distributed(_exchange, 2)
    for rank, (local, local_sizes, back, grad) in enumerate(results):
        experts = [2 * rank, 2 * rank + 1]
        # Grouped by local expert; within an expert, by source rank then original order.
        expected = torch.cat([_rows(source)[_rows(source)[:, 1] == e] for e in experts for source in (0, 1)])
        assert torch.equal(local, expected)
        assert local_sizes.tolist() == [COUNTS[0][e] + COUNTS[1][e] for e in experts]
        assert torch.equal(back, 2 * _rows(rank))
        assert torch.equal(grad, torch.full_like(grad, 2.0))
