"""The cross-entropy kernels in PyTorch: the rule the Triton kernels follow, and the CPU's path.

Legend: N rows (tokens), V this rank's vocabulary slice; ``target [N]`` int64, the label's column
in this slice or -1 where another rank holds it. Arithmetic in fp32 on logits of any dtype.
"""

import torch


def row_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits [N, V]``: its max, the sum of ``exp(logit - max)``, and the target's
    logit (0 where ``target`` is -1); all fp32 ``[N]``."""
    values = logits.float()
    row_max = values.max(dim=-1).values
    sum_exp = torch.exp(values - row_max[:, None]).sum(dim=-1)
    owned = target >= 0
    target_logit = values.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
    return row_max, sum_exp, torch.where(owned, target_logit, torch.zeros_like(target_logit))


def logits_grad_(logits: torch.Tensor, logsumexp: torch.Tensor, target: torch.Tensor,
                 grad_loss: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits [N, V]`` with the gradient of the rows' losses: ``grad_loss[n] *
    (softmax(logits[n]) - onehot(target[n]))``, the softmax from the whole vocabulary's fp32
    ``logsumexp [N]``. Returns ``logits``."""
    grad = torch.exp(logits.float() - logsumexp[:, None])
    # Minus one at the target column of the rows this slice owns: no index list, no host sync.
    owned = (target >= 0).to(grad.dtype)
    grad.scatter_add_(1, target.clamp(min=0)[:, None], -owned[:, None])
    return logits.copy_(grad * grad_loss.float()[:, None])
