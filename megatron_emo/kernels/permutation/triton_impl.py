"""Dispatch and combine on one rank in Triton: the gather into expert order and the gate-weighted
sum back, forward and backward.

Legend: T tokens, K routed top-k, N = T*K expert rows, h hidden width; ``order [N]`` the flat
(token, slot) index of each row, ``slot_rows [T, K]`` its inverse (the row of each slot).

The row order is the reference's: a stable sort of the flat expert indices on the device
(``torch.argsort``), and the group sizes a scatter-add; ``slot_rows`` is one scatter. Then two
kernels, used twice each; arithmetic in fp32, every output element written by one program (no
atomics, deterministic):
  _expand_kernel   out[i] = src[order[i] // K]                       permute forward (bitwise copy)
                   out[i] = w[order[i]] * src[order[i] // K] and     unpermute backward: d rows,
                   d w[order[i]] = <src[order[i] // K], rows[i]>     and the gates' gradient
  _combine_kernel  out[t] = sum_k (w[t, k] *) rows[slot_rows[t, k]]  unpermute forward; permute
                                                                     backward (d rows -> d tokens)
The permute backward thus sums a token's K row gradients in fp32 and rounds once, where
``index_select``'s backward would add them into bf16 with atomics.
"""

import torch
import triton
import triton.language as tl

from megatron_emo.kernels.backend import triton_interpreting
from megatron_emo.kernels.permutation import reference

INTERPRETING = triton_interpreting()
BLOCK_ROWS = 4 if INTERPRETING else 16
"""Rows (or tokens) per program. Under the interpreter small blocks, so that the CPU tests'
shapes span several programs and column chunks."""
MAX_BLOCK_H = 16 if INTERPRETING else 1024


def _block_h(hidden: int) -> int:
    return min(MAX_BLOCK_H, triton.next_power_of_2(hidden))


@triton.jit
def _expand_kernel(
    src_ptr, order_ptr, out_ptr, weights_ptr, rows_ptr, grad_weights_ptr,
    num_rows, hidden, stride_src, stride_out, stride_rows,
    TOPK: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    slots = tl.load(order_ptr + rows, mask=row_ok, other=0)
    tokens = (slots // TOPK).to(tl.int64)
    rows = rows.to(tl.int64)
    if WEIGHTED:
        gates = tl.load(weights_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)
        dots = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < hidden)[None, :]
        x = tl.load(src_ptr + tokens[:, None] * stride_src + cols[None, :], mask=ok, other=0.0)
        if WEIGHTED:
            y_ptrs = rows_ptr + rows[:, None] * stride_rows + cols[None, :]
            y = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
            dots += tl.sum(x.to(tl.float32) * y, axis=1)
            x = x.to(tl.float32) * gates[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, x.to(out_ptr.dtype.element_ty), mask=ok)
    if WEIGHTED:
        tl.store(grad_weights_ptr + slots, dots, mask=row_ok)


@triton.jit
def _combine_kernel(
    rows_ptr, slot_rows_ptr, weights_ptr, out_ptr,
    num_tokens, hidden, stride_rows, stride_out,
    TOPK: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < num_tokens
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = token_ok[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        slot = tokens.to(tl.int64) * TOPK + k
        row = tl.load(slot_rows_ptr + slot, mask=token_ok, other=0)
        y = tl.load(rows_ptr + row[:, None] * stride_rows + cols[None, :], mask=ok, other=0.0)
        if WEIGHTED:
            y = y.to(tl.float32) * tl.load(weights_ptr + slot, mask=token_ok, other=0.0)[:, None]
        acc += y.to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def expand(src, order, topk, weights=None, rows=None):
    """``out[i] = src[order[i] // topk]``; with ``weights`` (``[T, K]``) scaled by the gate, and
    also returning ``d weights [T, K]`` = the dot of ``src[token]`` with ``rows[i]``."""
    num_rows, hidden = order.shape[0], src.shape[1]
    out = torch.empty(num_rows, hidden, dtype=src.dtype, device=src.device)
    weighted = weights is not None
    grad_weights = torch.empty_like(weights) if weighted else None
    if num_rows:
        _expand_kernel[(triton.cdiv(num_rows, BLOCK_ROWS),)](
            src, order, out, weights if weighted else src, rows if weighted else src,
            grad_weights if weighted else src,
            num_rows, hidden, src.stride(0), out.stride(0), rows.stride(0) if weighted else 0,
            TOPK=topk, WEIGHTED=weighted, BLOCK_R=BLOCK_ROWS, BLOCK_H=_block_h(hidden),
        )  # fmt: skip
    return (out, grad_weights) if weighted else out


def combine(rows, slot_rows, weights=None):
    """``out[t] = sum_k (weights[t, k] *) rows[slot_rows[t, k]]``, ``[T, h]`` in rows' dtype."""
    (num_tokens, topk), hidden = slot_rows.shape, rows.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=rows.dtype, device=rows.device)
    if num_tokens:
        block_h = _block_h(hidden)
        grid = (triton.cdiv(num_tokens, BLOCK_ROWS), triton.cdiv(hidden, block_h))
        _combine_kernel[grid](
            rows, slot_rows, rows if weights is None else weights, out,
            num_tokens, hidden, rows.stride(0), out.stride(0),
            TOPK=topk, WEIGHTED=weights is not None, BLOCK_T=BLOCK_ROWS, BLOCK_H=block_h,
        )  # fmt: skip
    return out


def slot_rows_of(order, shape):
    """The inverse permutation: int64 ``[T, K]`` (``shape``), the row of each (token, slot)."""
    inverse = torch.empty_like(order)
    inverse.scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return inverse.view(shape)


class PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, order, topk):
        ctx.save_for_backward(order)
        ctx.slots = (tokens.shape[0], topk)
        return expand(tokens, order, topk)

    @staticmethod
    def backward(ctx, grad_rows):
        (order,) = ctx.saved_tensors
        return combine(grad_rows.contiguous(), slot_rows_of(order, ctx.slots)), None, None


class UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weights, order):
        ctx.save_for_backward(rows, weights, order)
        return combine(rows, slot_rows_of(order, weights.shape), weights)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights, order = ctx.saved_tensors
        grad_rows, grad_weights = expand(
            grad_out.contiguous(), order, weights.shape[1], weights=weights, rows=rows
        )
        return grad_rows, grad_weights, None


def permute(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """See :func:`megatron_emo.kernels.permutation.reference.permute`."""
    order = reference.sort_by_expert(indices)
    rows = PermuteFunction.apply(tokens.contiguous(), order, indices.shape[1])
    return rows, reference.tokens_per_expert(indices, num_experts), order


def unpermute(rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """See :func:`megatron_emo.kernels.permutation.reference.unpermute`."""
    return UnpermuteFunction.apply(rows.contiguous(), weights.contiguous(), order)
