"""Cross-entropy over a vocabulary split across tensor-parallel ranks, without an fp32 copy of the
logits: ``cross_entropy(logits, target, group)``.

The forward reads each rank's logits once for the row statistics (max, sum of exp, target logit)
and combines them over ``group``; the backward writes the gradient over the logits in place (the
logits are the output layer's, which no other op keeps). Fused Triton kernels on CUDA, Triton's
interpreter under ``TRITON_INTERPRET=1``, the PyTorch reference elsewhere
(:func:`megatron_emo.kernels.backend.implementation`, which logs the path once).
"""

from typing import Optional

import torch
import torch.distributed as dist

from megatron_emo.kernels.backend import implementation

__all__ = ["cross_entropy"]


def _local_target(target: torch.Tensor, vocab: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Each label's column in this rank's slice of the vocabulary, or -1 where another rank holds it."""
    first = vocab * (group.rank() if group is not None else 0)
    local = target.reshape(-1) - first
    return torch.where((local >= 0) & (local < vocab), local, -1)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        vocab = logits.shape[-1]
        rows = logits.view(-1, vocab)
        local_target = _local_target(target, vocab, group)
        kernels = implementation("cross_entropy", logits.device)
        row_max, sum_exp, target_logit = kernels.row_stats(rows, local_target)
        if group is not None and group.size() > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit])
            dist.all_reduce(sums, group=group)
            row_max, (sum_exp, target_logit) = global_max, sums
        logsumexp = row_max + torch.log(sum_exp)
        ctx.save_for_backward(logits, logsumexp, local_target)
        return (logsumexp - target_logit).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, logsumexp, local_target = ctx.saved_tensors
        kernels = implementation("cross_entropy", logits.device)
        kernels.logits_grad_(logits.view(-1, logits.shape[-1]), logsumexp, local_target, grad_loss.reshape(-1))
        return logits, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                  group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token cross-entropy of ``logits [..., V]``, this rank's slice of a vocabulary split
    evenly over ``group`` (rank r holds columns ``r*V .. (r+1)*V``; None: the whole vocabulary).

    Args:
        logits: ``[..., V]`` with contiguous rows, any float dtype; differentiable. Its storage
            receives the gradient in the backward, so nothing else may read it afterwards.
        target: int64 ``[...]`` labels in the whole vocabulary.
        group: the tensor-parallel group, or None.

    Returns:
        fp32 ``[...]`` losses, ``logsumexp(logits) - logits[target]`` in fp32.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in their leading dims")
    return _CrossEntropy.apply(logits.contiguous(), target, group)
