"""Document-pooled routing in Triton: the forward and backward kernels and their autograd Function.

Legend: T tokens, E routed experts, E_PAD the next power of two (padded lanes are masked), K top-k,
N segments, NP = len(pool_sizes) >= N, NB token blocks of BLOCK_T tokens, W bitmask words per
segment (E_PAD / WORD_BITS).

Forward, two Triton launches, no host synchronisation, no loop over segments on the host:
    segment_ids [T] --segments.segment_ordinals (PyTorch)--> ordinals [T], the dense segment
    index of every token.
    1. _route_pool_kernel, grid (NB,): softmax of every token; each block sums it over each of
       its "pieces" (the run of one segment inside the block) into pieces[seg + block]. An
       atomic ticket per segment tells the block that adds a segment's last piece; that block
       adds the segment's pieces in block order (deterministic, however many blocks the segment
       spans), ranks the experts by the sum (ties to the lower index) and stores the top-P as a
       bitmask in the segment's meta row [ticket, first token, last token, W words].
    2. _route_forward_kernel, grid (NB,): one pass over the tokens: pool-masked softmax,
       logsumexp, top-K by repeated argmax; writes probs [T, E], weights/indices [T, K], lse [T].
    Without a pool only kernel 2 runs.
Backward, one launch, the pool held fixed (as the method does not differentiate its choice):
    3. _route_backward_kernel, grid (NB,): g = grad_probs + scatter(grad_weights at indices);
       grad_logits = probs * (g - sum(probs * g) + grad_lse), zero outside the pool.

Arithmetic is fp32 for fp32/bf16/fp16 logits and fp64 for fp64 ones (gradient checks), as in
the reference. Every output is written by exactly one program and every sum has a fixed order
(the tickets only decide who computes a pool, not how), so results are bitwise deterministic.
"""

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from megatron_emo.kernels.routing.segments import segment_ordinals, segment_starts

MAX_EXPERTS = 256
"""Beyond this the pool kernel's E_PAD x E_PAD rank comparison no longer fits in registers."""

TILE_ELEMENTS = 2048
"""Logits per program tile (BLOCK_T x E_PAD): BLOCK_T = 16 tokens at E = 127, 8 at E = 255.
Chosen by a sweep on an H100 (fp32, T = 16384, ~31 segments per 4096 tokens, K = 7): 4096 was
10% slower at E = 127 and 8192 made the backward spill (25x slower)."""

MAX_BLOCK_T = 64
"""Cap for small E, so tiny-E tests still have segments crossing blocks."""

Alloc = Callable[..., torch.Tensor]


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _ordinal(ordinals_ptr, offs_t, num_tokens):
    """Dense segment index of tokens ``offs_t``; -1 outside ``[0, T)``."""
    inside = (offs_t >= 0) & (offs_t < num_tokens)
    return tl.load(ordinals_ptr + offs_t, mask=inside, other=-1)


# num_pools changes with every micro-batch in training (its segment count, rounded up to even):
# specialising on it (== 1, divisible by 16) would compile new variants mid-training.
@triton.jit(do_not_specialize=["num_pools"])
def _route_pool_kernel(
    logits_ptr,
    ordinals_ptr,
    pool_sizes_ptr,
    pieces_ptr,
    meta_ptr,
    num_tokens,
    num_experts,
    num_pools,
    stride_logits_t,
    stride_logits_e,
    BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr,
    WORD_BITS: tl.constexpr,
    META_COLS: tl.constexpr,
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
    seg = _ordinal(ordinals_ptr, offs_t, num_tokens)
    is_first = row_ok & (seg != _ordinal(ordinals_ptr, offs_t - 1, num_tokens))
    is_last = row_ok & (seg != _ordinal(ordinals_ptr, offs_t + 1, num_tokens))
    # meta row of a segment: [ticket, first token, last token, bitmask words...]. Segments past
    # num_pools violate the caller's contract; they are only kept from writing out of bounds.
    in_range = row_ok & (seg < num_pools)
    tl.store(meta_ptr + seg * META_COLS + 1, offs_t, mask=in_range & is_first)
    tl.store(meta_ptr + seg * META_COLS + 2, offs_t, mask=in_range & is_last)

    # Segments are contiguous, so this block holds segments seg_lo .. seg_hi, each as one piece.
    # Piece (s, block) goes to row s + block: unique, since a later segment never sits in an
    # earlier block, and a segment's pieces are consecutive rows.
    seg_lo = tl.min(tl.where(row_ok, seg, num_tokens), axis=0)
    seg_hi = tl.max(seg, axis=0)
    for s in range(seg_lo, seg_hi + 1):
        in_s = seg == s
        piece = tl.sum(tl.where(in_s[:, None], probs, 0.0), axis=0)
        tl.store(pieces_ptr + (s + block).to(tl.int64) * E_PAD + offs_e, piece)
        # The last block to add its piece picks the pool, with no second launch. Every block
        # adds -(its tokens of s), the block holding s's first token also -first, the one
        # holding its last token last + 1, to a ticket zeroed on the host. The total is
        # -L + (last + 1 - first) = 0 once all L tokens are in, and never before: without
        # the last token the sum is < 0; with it, missing tokens leave it > 0.
        ticket = -tl.sum(in_s.to(tl.int32), axis=0)
        ticket -= tl.sum(tl.where(in_s & is_first, offs_t, 0), axis=0)
        ticket += tl.sum(tl.where(in_s & is_last, offs_t + 1, 0), axis=0)
        # All threads' piece stores before the release (acq_rel atomics are the default).
        tl.debug_barrier()
        before = tl.atomic_add(meta_ptr + s * META_COLS, ticket, mask=s < num_pools)
        if (s < num_pools) & (before + ticket == 0):
            # .cg: read L2, where the other blocks' pieces are, never a stale L1 line.
            block_lo = tl.load(meta_ptr + s * META_COLS + 1, cache_modifier=".cg") // BLOCK_T
            block_hi = tl.load(meta_ptr + s * META_COLS + 2, cache_modifier=".cg") // BLOCK_T
            sums = tl.zeros([E_PAD], dtype=pieces_ptr.dtype.element_ty)
            # Block order, whoever finishes last: the same sum on every run.
            for b in range(block_lo, block_hi + 1):
                sums += tl.load(pieces_ptr + (s + b) * E_PAD + offs_e, cache_modifier=".cg")
            # Sums are >= 0, so -1 ranks padded lanes after every real expert.
            sums = tl.where(col_ok, sums, -1.0)
            # rank[e] = number of experts ahead of e: a larger sum, or an equal sum at a lower
            # index. This is the reference's stable descending sort, tie rule included.
            ahead = (sums[:, None] > sums[None, :]) | (
                (sums[:, None] == sums[None, :]) & (offs_e[:, None] < offs_e[None, :])
            )
            rank = tl.sum(ahead.to(tl.int32), axis=0)
            pool = tl.load(pool_sizes_ptr + s)
            bits = ((rank < pool) & col_ok).to(tl.int32) << (offs_e % WORD_BITS)
            # OR rather than sum: the word's top bit makes it negative.
            words = tl.reduce(tl.reshape(bits, [E_PAD // WORD_BITS, WORD_BITS]), 1, _bitwise_or)
            offs_w = tl.arange(0, E_PAD // WORD_BITS)
            tl.store(meta_ptr + s * META_COLS + 3 + offs_w, words)


@triton.jit(do_not_specialize=["num_pools"])
def _route_forward_kernel(
    logits_ptr,
    ordinals_ptr,
    meta_ptr,
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
    META_COLS: tl.constexpr,
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
        seg = _ordinal(ordinals_ptr, offs_t, num_tokens)
        word = tl.load(
            meta_ptr + seg[:, None] * META_COLS + 3 + offs_e[None, :] // WORD_BITS,
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
    # candidates at probability 0 (reachable with pool < K, which the contract excludes, and
    # when the softmax underflows to 0 in fp32 for all but a few experts at very large logits);
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
            grad += tl.where(
                offs_e[None, :] == index[:, None], grad_w.to(probs.dtype)[:, None], 0.0
            )
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
    segment_ids: Optional[torch.Tensor],
    pool_sizes: Optional[torch.Tensor],
    topk: int,
    *,
    alloc: Alloc = torch.empty,
):
    """Launch the forward kernels.

    Args:
        logits: float ``[T, E]``, any strides; fp32, bf16, fp16 or fp64.
        segment_ids: int ``[T]``, contiguous segments; unused with no pool.
        pool_sizes: int ``[NP >= N]`` contiguous, pool of segment i at entry i; None: no pool.
        topk: K.
        alloc: allocates every output and workspace, ``alloc(shape, dtype=, device=)``; tests pass
            one that poisons them to prove every element read is written.

    Returns:
        ``(weights, indices, probs, lse)``: fp32 (fp64 for fp64 logits) ``[T, K]``, int64
        ``[T, K]``, ``[T, E]``, ``[T]``.
    """
    num_tokens, num_experts = logits.shape
    device = logits.device
    # The reference's at_least_fp32, without materialising the upcast copy.
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    e_pad, block_t = _geometry(num_experts)
    word_bits = min(32, e_pad)
    meta_cols = 3 + e_pad // word_bits
    weights = alloc((num_tokens, topk), dtype=out_dtype, device=device)
    indices = alloc((num_tokens, topk), dtype=torch.int64, device=device)
    probs = alloc((num_tokens, num_experts), dtype=out_dtype, device=device)
    lse = alloc((num_tokens,), dtype=out_dtype, device=device)
    if num_tokens == 0:
        return weights, indices, probs, lse
    num_blocks = triton.cdiv(num_tokens, block_t)
    grid = (num_blocks,)
    if pool_sizes is None:
        ordinals = meta = None  # HAS_POOL=False compiles their uses out
        num_pools = 0
    else:
        num_pools = pool_sizes.shape[0]
        ordinals = segment_ordinals(segment_starts(segment_ids), dtype=torch.int32)
        # seg + block < T + NB, whatever N is: no write can fall outside.
        pieces = alloc((num_tokens + num_blocks, e_pad), dtype=out_dtype, device=device)
        # Zeroed, not poisoned: the tickets count up from 0. Every other entry read is written.
        meta = torch.zeros((num_pools, meta_cols), dtype=torch.int32, device=device)
        _route_pool_kernel[grid](
            logits, ordinals, pool_sizes, pieces, meta,
            num_tokens, num_experts, num_pools,
            logits.stride(0), logits.stride(1),
            BLOCK_T=block_t, E_PAD=e_pad, WORD_BITS=word_bits, META_COLS=meta_cols,
            # The E_PAD x E_PAD rank comparison spills with 4 warps at E_PAD = 256 (7x slower).
            num_warps=8 if e_pad > 128 else 4,
        )  # fmt: skip
    _route_forward_kernel[grid](
        logits, ordinals, meta, weights, indices, probs, lse,
        num_tokens, num_experts, num_pools,
        logits.stride(0), logits.stride(1),
        TOPK=topk, HAS_POOL=pool_sizes is not None, BLOCK_T=block_t, E_PAD=e_pad,
        K_PAD=triton.next_power_of_2(topk), WORD_BITS=word_bits, META_COLS=meta_cols,
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
    present = [
        g.contiguous() if g is not None else probs for g in (grad_weights, grad_probs, grad_lse)
    ]
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
    """``(logits, segment_ids, pool_sizes, topk) -> (weights, indices, probs, lse)``.

    The backward is one fused kernel; the pool and the top-K indices are held fixed.
    """

    @staticmethod
    def forward(ctx, logits, segment_ids, pool_sizes, topk):
        weights, indices, probs, lse = route_forward(logits, segment_ids, pool_sizes, topk)
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
        raise ValueError(
            f"logits must be a floating [T, E] tensor, got {logits.dtype} {tuple(logits.shape)}"
        )
    num_tokens, num_experts = logits.shape
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(
            f"the Triton router supports 1..{MAX_EXPERTS} experts, got E={num_experts}"
        )
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in 1..E={num_experts}, got {topk}")
    if pool_sizes is None:
        return
    if segment_ids is None or segment_ids.shape != (num_tokens,):
        shape = None if segment_ids is None else tuple(segment_ids.shape)
        raise ValueError(
            f"segment_ids must be [T={num_tokens}] when pool_sizes is given, got {shape}"
        )
    for name, tensor in (("segment_ids", segment_ids), ("pool_sizes", pool_sizes)):
        if tensor.is_floating_point() or tensor.device != logits.device:
            raise ValueError(
                f"{name} must be an integer tensor on {logits.device}, "
                f"got {tensor.dtype} on {tensor.device}"
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
    """Triton :func:`megatron_emo.kernels.routing.reference.route`: same arguments, outputs and
    gradients.

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
    if pool_sizes is not None:
        pool_sizes = pool_sizes.contiguous()
    weights, indices, probs, lse = RouteFunction.apply(logits, segment_ids, pool_sizes, topk)
    return (weights, indices, probs, lse) if return_logsumexp else (weights, indices, probs)
