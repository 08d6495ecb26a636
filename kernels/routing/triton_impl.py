"""Document-pooled routing in Triton: the forward and backward kernels and their autograd Function.

Legend: T tokens, E routed experts, E_PAD the next power of two (padded lanes are masked), K top-k,
N segments, NP = len(pool_sizes) >= N, NB token blocks of BLOCK_T tokens, W bitmask words per
segment (E_PAD / WORD_BITS).

Forward, no host synchronisation, no loop over segments on the host:
    segment_ids [T] --torch cumsum--> seg [T], dense and non-decreasing (0 .. N-1)
    1. _route_segment_sums_kernel, grid (NB,): softmax of every token; each block sums it over
       each of its "pieces" (the run of one segment inside the block) into pieces[seg + block],
       and records every segment's first and last token.
    2. _route_pool_kernel, grid (min(NP, T),): one program per segment adds its pieces in block
       order (a deterministic reduction, however many blocks the segment spans), ranks the
       experts by that sum (ties to the lower index) and writes the top-P as a bitmask [NP, W].
    3. _route_forward_kernel, grid (NB,): one pass over the tokens: pool-masked softmax,
       logsumexp, top-K by repeated argmax; writes probs [T, E], weights/indices [T, K], lse [T].
    Without a pool only kernel 3 runs.
Backward, one launch, the pool held fixed (as the method does not differentiate its choice):
    4. _route_backward_kernel, grid (NB,): g = grad_probs + scatter(grad_weights at indices);
       grad_logits = probs * (g - sum(probs * g) + grad_lse), zero outside the pool.

Arithmetic is fp32 for fp32/bf16/fp16 logits and fp64 for fp64 ones (gradient checks), as in
the reference. No atomics: every output is written by exactly one program, so results are
bitwise deterministic.
"""

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from megatron_emo.routing.reference import at_least_fp32, segment_positions

MAX_EXPERTS = 256
"""Beyond this the pool kernel's E_PAD x E_PAD rank comparison no longer fits in registers."""

TILE_ELEMENTS = 4096
"""Logits per program tile (BLOCK_T x E_PAD): BLOCK_T = 32 tokens at E = 127."""

MAX_BLOCK_T = 64
"""Cap for small E, so tiny-E tests still have segments crossing blocks."""

Alloc = Callable[..., torch.Tensor]


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _route_segment_sums_kernel(
    logits_ptr,
    seg_ptr,
    pieces_ptr,
    first_ptr,
    last_ptr,
    num_tokens,
    num_experts,
    num_pools,
    stride_logits_t,
    stride_logits_e,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
):
    block = tl.program_id(0)
    offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    row_ok = offs_t < num_tokens
    col_ok = offs_e < num_experts
    # Padded rows load zeros (finite), padded lanes -inf (zero probability).
    x = tl.load(
        logits_ptr
        + offs_t.to(tl.int64)[:, None] * stride_logits_t
        + offs_e[None, :] * stride_logits_e,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    x = tl.where(col_ok[None, :], x.to(pieces_ptr.dtype.element_ty), float("-inf"))
    ex = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = ex / tl.sum(ex, axis=1)[:, None]

    # Padded rows get segment -1, which no piece below selects.
    seg = tl.load(seg_ptr + offs_t, mask=row_ok, other=-1)
    prev = tl.load(seg_ptr + offs_t - 1, mask=row_ok & (offs_t > 0), other=-1)
    succ = tl.load(seg_ptr + offs_t + 1, mask=offs_t + 1 < num_tokens, other=-1)
    # The pool kernel finds a segment's blocks from its first and last token. Segments past
    # num_pools violate the caller's contract; they are only kept from writing out of bounds.
    in_range = row_ok & (seg < num_pools)
    tl.store(first_ptr + seg, offs_t, mask=in_range & (seg != prev))
    tl.store(last_ptr + seg, offs_t, mask=in_range & (seg != succ))

    # Segments are contiguous, so this block holds segments seg_lo .. seg_hi, each as one piece.
    # Piece (s, block) goes to row s + block: unique, since a later segment never sits in an
    # earlier block, and a segment's pieces are consecutive rows for the pool kernel to add.
    seg_lo = tl.load(seg_ptr + block * BLOCK_T)
    seg_hi = tl.max(seg, axis=0)
    for s in range(seg_lo, seg_hi + 1):
        piece = tl.sum(tl.where((seg == s)[:, None], probs, 0.0), axis=0)
        tl.store(pieces_ptr + (s + block).to(tl.int64) * E_PAD + offs_e, piece)


@triton.jit
def _route_pool_kernel(
    pieces_ptr,
    first_ptr,
    last_ptr,
    seg_ptr,
    pool_sizes_ptr,
    bits_ptr,
    num_tokens,
    num_experts,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
    WORD_BITS: tl.constexpr,
):
    s = tl.program_id(0)
    # The segment count lives on the device (the last token's segment + 1): programs past it,
    # which exist because only an upper bound is known on the host, do nothing.
    num_segments = tl.load(seg_ptr + num_tokens - 1) + 1
    if s < num_segments:
        offs_e = tl.arange(0, E_PAD)
        block_lo = tl.load(first_ptr + s) // BLOCK_T
        block_hi = tl.load(last_ptr + s) // BLOCK_T
        sums = tl.zeros([E_PAD], dtype=pieces_ptr.dtype.element_ty)
        # Block order, whatever the segment's length: the same sum on every run.
        for block in range(block_lo, block_hi + 1):
            sums += tl.load(pieces_ptr + (s + block).to(tl.int64) * E_PAD + offs_e)
        # Sums are >= 0, so -1 ranks padded lanes after every real expert.
        col_ok = offs_e < num_experts
        sums = tl.where(col_ok, sums, -1.0)
        # rank[e] = number of experts ahead of e: a larger sum, or an equal sum at a lower
        # index. This is the reference's stable descending sort, tie rule included.
        ahead = (sums[:, None] > sums[None, :]) | (
            (sums[:, None] == sums[None, :]) & (offs_e[:, None] > offs_e[None, :])
        )
        rank = tl.sum(ahead.to(tl.int32), axis=0)
        pool = tl.load(pool_sizes_ptr + s)
        bits = ((rank < pool) & col_ok).to(tl.int32) << (offs_e % WORD_BITS)
        # OR rather than sum: the word's top bit makes it negative.
        words = tl.reduce(tl.reshape(bits, [E_PAD // WORD_BITS, WORD_BITS]), 1, _bitwise_or)
        offs_w = tl.arange(0, E_PAD // WORD_BITS)
        tl.store(bits_ptr + s * (E_PAD // WORD_BITS) + offs_w, words)


@triton.jit
def _route_forward_kernel(
    logits_ptr,
    seg_ptr,
    bits_ptr,
    weights_ptr,
    indices_ptr,
    probs_ptr,
    lse_ptr,
    num_tokens,
    num_experts,
    num_pools,
    stride_logits_t,
    stride_logits_e,
    TOPK: tl.constexpr,
    HAS_POOL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    WORD_BITS: tl.constexpr,
):
    block = tl.program_id(0)
    offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    row_ok = offs_t < num_tokens
    col_ok = offs_e < num_experts
    rows = offs_t.to(tl.int64)[:, None]
    x = tl.load(
        logits_ptr + rows * stride_logits_t + offs_e[None, :] * stride_logits_e,
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(probs_ptr.dtype.element_ty)
    keep = col_ok[None, :]
    if HAS_POOL:
        seg = tl.load(seg_ptr + offs_t, mask=row_ok, other=0)
        word = tl.load(
            bits_ptr + seg[:, None] * (E_PAD // WORD_BITS) + offs_e[None, :] // WORD_BITS,
            mask=(row_ok & (seg < num_pools))[:, None],
            other=0,
        )
        in_pool = ((word >> (offs_e % WORD_BITS)[None, :]) & 1) != 0
        # Padded rows keep every expert so that they stay finite (they are never stored).
        keep = keep & (in_pool | ~row_ok[:, None])
    x = tl.where(keep, x, float("-inf"))
    row_max = tl.max(x, axis=1)
    ex = tl.exp(x - row_max[:, None])
    denom = tl.sum(ex, axis=1)
    probs = ex / denom[:, None]
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(probs_ptr + rows * num_experts + offs_e[None, :], probs, mask=out_ok)
    tl.store(lse_ptr + offs_t, row_max + tl.log(denom), mask=row_ok)

    # Top-K by K rounds of argmax; ties go to the lower index. Experts outside the pool stay
    # candidates at probability 0 (only reachable with pool < K, which the contract excludes);
    # padded lanes sit at -1 and picked experts drop to -2.
    work = tl.where(col_ok[None, :], probs, -1.0)
    offs_k = tl.arange(0, K_PAD)
    top_w = tl.zeros([BLOCK_T, K_PAD], dtype=probs.dtype)
    top_i = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOPK):
        best = tl.max(work, axis=1)
        best_i = tl.min(tl.where(work == best[:, None], offs_e[None, :], E_PAD), axis=1)
        top_w = tl.where(offs_k[None, :] == k, best[:, None], top_w)
        top_i = tl.where(offs_k[None, :] == k, best_i[:, None], top_i)
        work = tl.where(offs_e[None, :] == best_i[:, None], -2.0, work)
    top_ok = row_ok[:, None] & (offs_k[None, :] < TOPK)
    top_off = rows * TOPK + offs_k[None, :]
    tl.store(weights_ptr + top_off, top_w, mask=top_ok)
    tl.store(indices_ptr + top_off, top_i.to(tl.int64), mask=top_ok)


@triton.jit
def _route_backward_kernel(
    probs_ptr,
    indices_ptr,
    grad_weights_ptr,
    grad_probs_ptr,
    grad_lse_ptr,
    grad_logits_ptr,
    num_tokens,
    num_experts,
    TOPK: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
):
    block = tl.program_id(0)
    offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    row_ok = offs_t < num_tokens
    rows = offs_t.to(tl.int64)[:, None]
    tile_ok = row_ok[:, None] & (offs_e < num_experts)[None, :]
    tile_off = rows * num_experts + offs_e[None, :]
    # probs is 0 outside the pool and in padded lanes, which zeroes the gradient there.
    probs = tl.load(probs_ptr + tile_off, mask=tile_ok, other=0.0)
    if HAS_GRAD_PROBS:
        grad = tl.load(grad_probs_ptr + tile_off, mask=tile_ok, other=0.0).to(probs.dtype)
    else:
        grad = tl.zeros([BLOCK_T, E_PAD], dtype=probs.dtype)
    if HAS_GRAD_WEIGHTS:
        # weights[t, k] = probs[t, indices[t, k]]: scatter its gradient onto the probs.
        for k in tl.static_range(TOPK):
            index = tl.load(indices_ptr + offs_t * TOPK + k, mask=row_ok, other=-1)
            grad_w = tl.load(grad_weights_ptr + offs_t * TOPK + k, mask=row_ok, other=0.0)
            grad += tl.where(offs_e[None, :] == index[:, None], grad_w.to(probs.dtype)[:, None], 0.0)
    # Softmax backward; d lse / d logits = probs adds grad_lse inside the bracket.
    shift = tl.sum(probs * grad, axis=1)
    if HAS_GRAD_LSE:
        shift -= tl.load(grad_lse_ptr + offs_t, mask=row_ok, other=0.0).to(probs.dtype)
    grad_logits = probs * (grad - shift[:, None])
    tl.store(
        grad_logits_ptr + tile_off,
        grad_logits.to(grad_logits_ptr.dtype.element_ty),
        mask=tile_ok,
    )


def _geometry(num_experts: int) -> tuple[int, int]:
    """(E_PAD, BLOCK_T) for a number of experts."""
    e_pad = max(16, triton.next_power_of_2(num_experts))
    return e_pad, min(MAX_BLOCK_T, TILE_ELEMENTS // e_pad)


def route_forward(
    logits: torch.Tensor,
    seg: Optional[torch.Tensor],
    pool_sizes: Optional[torch.Tensor],
    topk: int,
    *,
    alloc: Alloc = torch.empty,
):
    """Launch the forward kernels.

    Args:
        logits: float ``[T, E]``, any strides; fp32, bf16, fp16 or fp64.
        seg: int ``[T]`` dense non-decreasing segment index (0 .. N-1), contiguous; None with no
            pool.
        pool_sizes: int ``[NP >= N]`` contiguous, pool of segment i at entry i; None: no pool.
        topk: K.
        alloc: allocates every output and workspace, ``alloc(shape, dtype=, device=)``; tests pass
            one that poisons them to prove every element read is written.

    Returns:
        ``(weights, indices, probs, lse)``: fp32 (fp64 for fp64 logits) ``[T, K]``, int64
        ``[T, K]``, ``[T, E]``, ``[T]``.
    """
    num_tokens, num_experts = logits.shape
    device, out_dtype = logits.device, at_least_fp32(logits).dtype
    e_pad, block_t = _geometry(num_experts)
    word_bits = min(32, e_pad)
    weights = alloc((num_tokens, topk), dtype=out_dtype, device=device)
    indices = alloc((num_tokens, topk), dtype=torch.int64, device=device)
    probs = alloc((num_tokens, num_experts), dtype=out_dtype, device=device)
    lse = alloc((num_tokens,), dtype=out_dtype, device=device)
    if num_tokens == 0:
        return weights, indices, probs, lse
    num_blocks = triton.cdiv(num_tokens, block_t)
    grid = (num_blocks,)
    if pool_sizes is None:
        bits, num_pools = seg, 0  # unused: HAS_POOL=False compiles them out
    else:
        num_pools = pool_sizes.shape[0]
        # seg + block < T + NB, whatever N is: no write can fall outside.
        pieces = alloc((num_tokens + num_blocks, e_pad), dtype=out_dtype, device=device)
        first = alloc((num_pools,), dtype=torch.int32, device=device)
        last = alloc((num_pools,), dtype=torch.int32, device=device)
        bits = alloc((num_pools, e_pad // word_bits), dtype=torch.int32, device=device)
        _route_segment_sums_kernel[grid](
            logits, seg, pieces, first, last,
            num_tokens, num_experts, num_pools,
            logits.stride(0), logits.stride(1),
            BLOCK_T=block_t, E_PAD=e_pad,
        )  # fmt: skip
        # N <= T, so programs past T could only find nothing to do.
        _route_pool_kernel[(min(num_pools, num_tokens),)](
            pieces, first, last, seg, pool_sizes, bits,
            num_tokens, num_experts,
            BLOCK_T=block_t, E_PAD=e_pad, WORD_BITS=word_bits,
            num_warps=8 if e_pad > 128 else 4,
        )  # fmt: skip
    _route_forward_kernel[grid](
        logits, seg, bits, weights, indices, probs, lse,
        num_tokens, num_experts, num_pools,
        logits.stride(0), logits.stride(1),
        TOPK=topk, HAS_POOL=pool_sizes is not None, BLOCK_T=block_t, E_PAD=e_pad,
        K_PAD=triton.next_power_of_2(topk), WORD_BITS=word_bits,
    )  # fmt: skip
    return weights, indices, probs, lse


def route_backward(
    probs: torch.Tensor,
    indices: torch.Tensor,
    grad_weights: Optional[torch.Tensor],
    grad_probs: Optional[torch.Tensor],
    grad_lse: Optional[torch.Tensor],
    logits_dtype: torch.dtype,
    *,
    alloc: Alloc = torch.empty,
) -> torch.Tensor:
    """Gradient of the routing outputs with respect to the logits, the pool held fixed.

    Args:
        probs: ``[T, E]`` contiguous, the forward's masked softmax (0 outside the pool).
        indices: int64 ``[T, K]`` contiguous, the forward's top-K.
        grad_weights, grad_probs, grad_lse: gradients of ``[T, K]``, ``[T, E]``, ``[T]``, or
            None where that output took no part in the loss.
        logits_dtype: dtype of the returned gradient (the logits').
        alloc: as in :func:`route_forward`.

    Returns:
        ``[T, E]`` in ``logits_dtype``.
    """
    num_tokens, num_experts = probs.shape
    grad_logits = alloc((num_tokens, num_experts), dtype=logits_dtype, device=probs.device)
    if num_tokens == 0:
        return grad_logits
    e_pad, block_t = _geometry(num_experts)
    # Absent gradients are compiled out; any tensor stands in for their pointers.
    present = [g.contiguous() if g is not None else probs for g in (grad_weights, grad_probs, grad_lse)]
    _route_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
        probs, indices, *present, grad_logits,
        num_tokens, num_experts,
        TOPK=indices.shape[1],
        HAS_GRAD_WEIGHTS=grad_weights is not None,
        HAS_GRAD_PROBS=grad_probs is not None,
        HAS_GRAD_LSE=grad_lse is not None,
        BLOCK_T=block_t, E_PAD=e_pad,
    )  # fmt: skip
    return grad_logits


class RouteFunction(torch.autograd.Function):
    """``(logits, seg, pool_sizes, topk) -> (weights, indices, probs, lse)`` with a fused backward."""

    @staticmethod
    def forward(ctx, logits, seg, pool_sizes, topk):
        weights, indices, probs, lse = route_forward(logits, seg, pool_sizes, topk)
        ctx.save_for_backward(probs, indices)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(indices)
        # Unused outputs arrive as None, and their kernel loads are compiled out.
        ctx.set_materialize_grads(False)
        return weights, indices, probs, lse

    @staticmethod
    def backward(ctx, grad_weights, grad_indices, grad_probs, grad_lse):
        probs, indices = ctx.saved_tensors
        grad_logits = route_backward(
            probs, indices, grad_weights, grad_probs, grad_lse, ctx.logits_dtype
        )
        return grad_logits, None, None, None


def _check_inputs(logits, segment_ids, pool_sizes, topk) -> None:
    """Shape, dtype and device checks that need no host synchronisation."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [T, E] tensor, got {logits.dtype} {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"the Triton router supports 1..{MAX_EXPERTS} experts, got E={num_experts}")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in 1..E={num_experts}, got {topk}")
    if pool_sizes is None:
        return
    if segment_ids is None or segment_ids.shape != (num_tokens,):
        shape = None if segment_ids is None else tuple(segment_ids.shape)
        raise ValueError(f"segment_ids must be [T={num_tokens}] when pool_sizes is given, got {shape}")
    for name, tensor in (("segment_ids", segment_ids), ("pool_sizes", pool_sizes)):
        if tensor.is_floating_point() or tensor.device != logits.device:
            raise ValueError(
                f"{name} must be an integer tensor on {logits.device}, got {tensor.dtype} on {tensor.device}"
            )
    if pool_sizes.dim() != 1:
        raise ValueError(f"pool_sizes must be 1-D [>= N], got {tuple(pool_sizes.shape)}")


def route(
    logits: torch.Tensor,
    segment_ids: Optional[torch.Tensor],
    pool_sizes: Optional[torch.Tensor],
    topk: int,
    *,
    return_logsumexp: bool = False,
):
    """Triton :func:`megatron_emo.routing.reference.route`: same arguments, outputs and gradients.

    Args:
        logits: ``[T, E]`` router logits, ``E <= MAX_EXPERTS``, any strides.
        segment_ids: int ``[T]`` on the logits' device, contiguous segments; ignored with no pool.
        pool_sizes: int ``[>= N]`` on the logits' device, each ``>= topk``; None for no pool.
        topk: K, ``1 <= K <= E``.
        return_logsumexp: also return the logsumexp of the masked logits.

    Returns:
        As the reference: ``(weights, indices, probs[, logsumexp])``.
    """
    _check_inputs(logits, segment_ids, pool_sizes, topk)
    seg = pool = None
    if pool_sizes is not None:
        seg = segment_positions(segment_ids)
        pool = pool_sizes.contiguous()
    weights, indices, probs, lse = RouteFunction.apply(logits, seg, pool, topk)
    return (weights, indices, probs, lse) if return_logsumexp else (weights, indices, probs)
