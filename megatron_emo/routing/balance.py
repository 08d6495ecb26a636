"""Router losses: Switch load balancing with global expert counts, and the router z-loss.

Both act on the *masked* router outputs, as EMO trains: the LB loss on the masked softmax, the
z-loss on the logsumexp of the masked logits.
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron_emo.kernels.permutation import tokens_per_expert


def load_balancing_loss(
    probs: torch.Tensor,
    indices: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch load-balancing loss with expert counts summed over a process group.

        L = (E / K) * sum_i (C_i / T_group) * mean_t probs[t, i]

    ``C_i`` counts the selections of expert i over every rank of ``group`` (the ranks that hold
    other tokens of the same micro-batch); the mean probability is rank-local and carries the
    gradient. 1.0 at perfect balance. Averaged over the ranks of the group (as data-parallel
    gradient averaging does), it equals the loss of the whole micro-batch on one process when
    every rank holds the same number of tokens.

    Args:
        probs: fp32 ``[T, E]`` masked softmax.
        indices: int64 ``[T, K]`` chosen routed experts.
        group: ranks to sum counts over; None for this process only. One all-reduce of E + 1
            values (counts and token count together).

    Returns:
        ``(loss, local_counts)``: the scalar loss and fp32 ``[E]`` this rank's counts.
    """
    num_tokens, num_experts = probs.shape
    topk = indices.shape[-1]
    # fp32: all-reduced together with the token count, appended on the device (a tensor made
    # from a Python list would be copied to the GPU synchronously).
    local_counts = tokens_per_expert(indices, num_experts).float()
    totals = torch.nn.functional.pad(local_counts, (0, 1), value=num_tokens)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    fraction = (totals[:-1] / totals[-1].clamp(min=1)).to(probs.dtype)
    mean_probs = probs.mean(dim=0)
    loss = (num_experts / topk) * torch.dot(fraction, mean_probs)
    return loss, local_counts


def z_loss(logsumexp: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(masked logits)².

    Args:
        logsumexp: fp32 ``[T]``.
    """
    return logsumexp.square().mean()
