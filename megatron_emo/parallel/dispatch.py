"""Expert-parallel dispatch and combine: expert-sorted rows to the ranks that hold the experts.

Legend: EP ranks, L experts per rank (global expert e lives on rank e // L as local e % L),
N rows this rank sends, M rows it receives.

    rows [N, h] sorted by global expert, counts [EP*L]
      --all_to_all_single(counts)--> received counts [EP (source), L]
      --one host sync: the split sizes of both directions--
      --all_to_all_single(rows)--> [M, h] ordered (source, local expert)
      --stable sort by local expert--> [M, h] grouped by local expert, group sizes [L]
    experts
    combine: the inverse sort, then all_to_all_single back with the splits swapped --> [N, h]

The only host synchronisation of a layer's forward is the split sizes (all_to_all_single takes
Python lists); the row all-to-alls carry autograd (megatron-core's ``all_to_all``), so the
backward sends gradients the other way with the same splits. Works on NCCL and on gloo.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import all_to_all


@dataclass
class DispatchPlan:
    """What :func:`combine` needs to send rows back where :func:`dispatch` took them from."""

    group: dist.ProcessGroup
    send_splits: list[int]
    receive_splits: list[int]
    local_order: torch.Tensor
    """int64 ``[M]``: received row of each expert-grouped row."""


def dispatch(rows: torch.Tensor, group_sizes: torch.Tensor, group: dist.ProcessGroup):
    """Send expert-sorted rows to the ranks holding their experts.

    Args:
        rows: ``[N, h]`` sorted by global expert.
        group_sizes: int64 ``[EP * L]`` rows per global expert (padding experts included).
        group: the expert-parallel process group.

    Returns:
        ``(local_rows, local_group_sizes, plan)``: ``[M, h]`` rows of this rank's experts grouped
        by local expert (by source rank within an expert), int64 ``[L]``, and the
        :class:`DispatchPlan` for :func:`combine`.
    """
    ep_size = dist.get_world_size(group)
    send_counts = group_sizes.view(ep_size, -1)
    received_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(received_counts, send_counts, group=group)
    send_splits, receive_splits = torch.stack([send_counts.sum(1), received_counts.sum(1)]).tolist()
    received = all_to_all(group, rows, receive_splits, send_splits)
    num_local = send_counts.shape[1]
    local_expert = torch.arange(num_local, device=rows.device).repeat(ep_size)
    expert_of_row = local_expert.repeat_interleave(received_counts.flatten(), output_size=received.shape[0])
    local_order = torch.argsort(expert_of_row, stable=True)
    plan = DispatchPlan(group, send_splits, receive_splits, local_order)
    return received.index_select(0, local_order), received_counts.sum(0), plan


def combine(local_rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Send expert outputs back: ``[M, h]`` in :func:`dispatch`'s output order → ``[N, h]`` in
    the order of its input."""
    # Row i of local_rows came from received row local_order[i]: put it back there.
    received = local_rows.new_empty(local_rows.shape).index_copy(0, plan.local_order, local_rows)
    return all_to_all(plan.group, received, plan.send_splits, plan.receive_splits)
