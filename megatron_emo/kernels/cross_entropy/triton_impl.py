"""The cross-entropy kernels in Triton: one program per row, the vocabulary in column blocks, fp32
arithmetic on the logits' own dtype in memory (bf16 on GPU).

  _row_stats_kernel    online max and sum of exp over the row (one read), and the target's logit
  _logits_grad_kernel  softmax - onehot, times the row's loss gradient, written over the logits
                       (one read, one write)

So a micro-batch's loss and its gradient read the logits twice and write them once, with no fp32
copy of them (megatron-core's fused loss keeps an fp32 softmax for the backward).
"""

import torch
import triton
import triton.language as tl

from megatron_emo.kernels.backend import triton_interpreting

BLOCK_V = 64 if triton_interpreting() else 4096
"""Columns per step of a program's loop; under the interpreter small, so that the CPU tests'
vocabularies span several blocks."""


@triton.jit
def _row_stats_kernel(logits_ptr, target_ptr, max_ptr, sum_exp_ptr, target_logit_ptr, vocab, stride,
                      BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    row_max = tl.full((), float("-inf"), tl.float32)
    sum_exp = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        values = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(values, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(values - new_max), axis=0)
        row_max = new_max
    target = tl.load(target_ptr + row)
    owned = target >= 0
    target_logit = tl.load(base + tl.where(owned, target, 0)).to(tl.float32)
    tl.store(max_ptr + row, row_max)
    tl.store(sum_exp_ptr + row, sum_exp)
    tl.store(target_logit_ptr + row, tl.where(owned, target_logit, 0.0))


@triton.jit
def _logits_grad_kernel(logits_ptr, logsumexp_ptr, target_ptr, grad_loss_ptr, vocab, stride,
                        BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    logsumexp = tl.load(logsumexp_ptr + row)
    grad_loss = tl.load(grad_loss_ptr + row).to(tl.float32)
    target = tl.load(target_ptr + row)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < vocab
        values = tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = tl.exp(values - logsumexp) - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, (grad * grad_loss).to(logits_ptr.dtype.element_ty), mask=in_row)


def _rows(logits: torch.Tensor) -> tuple[int, int]:
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy kernels need logits with contiguous rows")
    return logits.shape


def row_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`megatron_emo.kernels.cross_entropy.reference.row_stats`."""
    rows, vocab = _rows(logits)
    row_max, sum_exp, target_logit = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if rows:
        _row_stats_kernel[(rows,)](logits, target.contiguous(), row_max, sum_exp, target_logit, vocab,
                                   logits.stride(0), BLOCK=BLOCK_V, num_warps=8)
    return row_max, sum_exp, target_logit


def logits_grad_(logits: torch.Tensor, logsumexp: torch.Tensor, target: torch.Tensor,
                 grad_loss: torch.Tensor) -> torch.Tensor:
    """As :func:`megatron_emo.kernels.cross_entropy.reference.logits_grad_`."""
    rows, vocab = _rows(logits)
    if rows:
        _logits_grad_kernel[(rows,)](logits, logsumexp.contiguous(), target.contiguous(), grad_loss.contiguous(),
                                     vocab, logits.stride(0), BLOCK=BLOCK_V, num_warps=8)
    return logits

