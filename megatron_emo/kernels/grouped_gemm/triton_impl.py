"""Grouped GEMM over expert-sorted rows in Triton: row and weight-gradient kernels, the SwiGLU
epilogues, and the autograd Functions.

Legend: N rows sorted by expert, E experts (E_PAD: next power of two), K reduction width, N_OUT
output width; h model width, F expert FFN width.

No host synchronisation: every program reads the group sizes itself (E_PAD lanes, cumulative sums
in registers).
- ``_grouped_rows_kernel``, ``c[rows of e] = a[rows of e] @ b[e]``, one program per (row tile,
  column tile). Row tiles are group-major: expert e owns cdiv(size_e, BLOCK_M) consecutive tiles,
  so no tile mixes experts, and a program finds its expert by counting the experts whose
  cumulative tile count it has passed. The grid has the worst case, cdiv(N, BLOCK_M) + E row
  tiles; the surplus programs exit at once. Consecutive programs share a row tile, so one
  expert's rows and weights are in L2 while its tiles run. ``b`` is read through its strides, so
  the dgrad runs the same kernel on ``b[e]`` transposed. Epilogues (constexpr EPILOGUE):
    PLAIN       store acc;
    SWIGLU      b = fc1 [E, h, 2F]: gate columns j and up columns F + j in one program (two
                accumulators); store ``c = [gate | up]`` (saved for the backward) and
                ``aux = silu(gate) * up``, from the stored (rounded) gate and up;
    SWIGLU_BWD  acc = dh, never rounded; load gate and up of the tile from ``aux`` and store
                ``c = [d gate | d up]``.
- ``_grouped_wgrad_kernel``, ``c[e] = a[rows of e]^T @ b[rows of e]``, one program per (expert,
  output tile), looping over the expert's rows; an empty expert stores exact zeros. With
  ACCUMULATE, ``c[e] += ...`` into an fp32 ``c`` instead (an empty expert's ``c`` is left as is).
Accumulation is fp32, outputs take the inputs' dtype. Every output element is written by exactly
one program, without atomics: results are deterministic.

The SwiGLU FFN: forward 2 launches (fc1 with SWIGLU, fc2), backward 4 (fc2 dgrad with
SWIGLU_BWD, fc2 wgrad, fc1 dgrad, fc1 wgrad).

Weight gradients and megatron-core's DDP: a weight that DDP gave an fp32 ``main_grad`` has its
gradient added there by the wgrad kernel itself (``weight.grad_added_to_main_grad``, the contract
of megatron-core's gradient-accumulation fusion), not returned in bf16 for DDP's hook to add in
a pass of its own. The routed experts hold most of the parameters, and every micro-batch
accumulates all of them: 8 bytes moved per parameter instead of 12, inside the GEMM.
"""

from typing import Callable

import torch
import triton
import triton.language as tl

from megatron_emo.kernels.grouped_gemm import tuning

PLAIN, SWIGLU, SWIGLU_BWD = (tl.constexpr(i) for i in (tuning.PLAIN_EPILOGUE, tuning.SWIGLU_EPILOGUE,
                                                      tuning.SWIGLU_BWD_EPILOGUE))
"""The epilogues (constexpr, so that the kernels can read them)."""

Alloc = Callable[..., torch.Tensor]


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 tiles as their raw 16-bit integers; in fp32 it forms
    # exactly the products the tensor cores form (bf16 x bf16 is exact in fp32).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:
        # fp32 inputs (tests): full fp32 products, not the tensor cores' tf32.
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _expert_rows(sizes_ptr, num_experts, expert, E_PAD: tl.constexpr):
    """(first row, end row) of ``expert`` in the sorted rows."""
    lanes = tl.arange(0, E_PAD)
    sizes = tl.load(sizes_ptr + lanes, mask=lanes < num_experts, other=0).to(tl.int32)
    mine = lanes == expert
    end = tl.sum(tl.where(mine, tl.cumsum(sizes, 0), 0), 0)
    return end - tl.sum(tl.where(mine, sizes, 0), 0), end


@triton.jit
def _tile_of(sizes_ptr, num_experts, tile, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """(expert, first row, expert's end row, total row tiles) of group-major row tile ``tile``."""
    lanes = tl.arange(0, E_PAD)
    sizes = tl.load(sizes_ptr + lanes, mask=lanes < num_experts, other=0).to(tl.int32)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    # Empty experts (and padded lanes) end where the previous expert ends: passed over.
    expert = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    mine = lanes == expert
    rows_end = tl.sum(tl.where(mine, tl.cumsum(sizes, 0), 0), 0)
    first_row = rows_end - tl.sum(tl.where(mine, sizes, 0), 0)
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
    first_row += (tile - first_tile) * BLOCK_M
    return expert, first_row, rows_end, tl.max(tiles_end, 0)


@triton.jit
def _swiglu_backward_half(
    d_hidden, rows, row_ok, cols, N_OUT, aux_ptr, c_ptr, stride_xm, stride_xn, stride_cm, stride_cn
):
    """Store ``[d gate | d up]`` of columns ``cols`` from ``d hidden`` and the saved gate, up."""
    ok = row_ok[:, None] & (cols < N_OUT)[None, :]
    x_ptrs = aux_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn
    gate = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptrs + N_OUT * stride_xn, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    dtype = c_ptr.dtype.element_ty
    tl.store(c_ptrs, (d_hidden * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=ok)
    tl.store(c_ptrs + N_OUT * stride_cn, (d_hidden * gate * sig).to(dtype), mask=ok)


@triton.autotune(
    configs=tuning.ROWS_CONFIGS,
    key=tuning.KEY,
    prune_configs_by=dict(early_config_prune=tuning.prune_rows_configs),
)
@triton.heuristics(dict(EVEN_K=lambda args: args["K"] % args["BLOCK_K"] == 0))
@triton.jit
def _grouped_rows_kernel(
    a_ptr, b_ptr, c_ptr, aux_ptr, sizes_ptr,
    num_experts, N_OUT, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn, stride_xm, stride_xn,
    ROWS_PER_EXPERT,
    EPILOGUE: tl.constexpr, UPCAST: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(N_OUT, BLOCK_N)
    tile_m, tile_n = pid // col_tiles, pid % col_tiles
    expert, first_row, rows_end, num_tiles = _tile_of(
        sizes_ptr, num_experts, tile_m, BLOCK_M, E_PAD
    )
    if tile_m >= num_tiles:
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < rows_end
    rows = rows.to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_OUT
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk
    b_ptrs += cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SWIGLU only; dropped otherwise
    for k0 in range(0, K, BLOCK_K):
        a_ok = row_ok[:, None]
        b_ok = col_ok[None, :]
        if not EVEN_K:
            a_ok = a_ok & (ks[None, :] < K - k0)
            b_ok = b_ok & (ks[:, None] < K - k0)
        a = tl.load(a_ptrs, mask=a_ok, other=0.0)
        acc = _mma(a, tl.load(b_ptrs, mask=b_ok, other=0.0), acc, UPCAST)
        if EPILOGUE == SWIGLU:
            up = tl.load(b_ptrs + N_OUT * stride_bn, mask=b_ok, other=0.0)
            acc_up = _mma(a, up, acc_up, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out_ok = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    dtype = c_ptr.dtype.element_ty
    if EPILOGUE == PLAIN:
        tl.store(c_ptrs, acc.to(dtype), mask=out_ok)
    elif EPILOGUE == SWIGLU:
        gate, up = acc.to(dtype), acc_up.to(dtype)
        tl.store(c_ptrs, gate, mask=out_ok)
        tl.store(c_ptrs + N_OUT * stride_cn, up, mask=out_ok)
        gate, up = gate.to(tl.float32), up.to(tl.float32)
        hidden = gate * tl.sigmoid(gate) * up
        x_ptrs = aux_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn
        tl.store(x_ptrs, hidden.to(dtype), mask=out_ok)
    else:  # SWIGLU_BWD: acc is d hidden. In two column halves: the gate and up tiles of the
        # whole tile beside the accumulator would spill registers.
        HALF: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        half_cols = tile_n * BLOCK_N + tl.arange(0, HALF)
        _swiglu_backward_half(left, rows, row_ok, half_cols, N_OUT, aux_ptr, c_ptr,
                              stride_xm, stride_xn, stride_cm, stride_cn)  # fmt: skip
        _swiglu_backward_half(right, rows, row_ok, half_cols + HALF, N_OUT, aux_ptr, c_ptr,
                              stride_xm, stride_xn, stride_cm, stride_cn)  # fmt: skip


@triton.autotune(
    configs=tuning.WGRAD_CONFIGS,
    key=tuning.WGRAD_KEY,
    prune_configs_by=dict(early_config_prune=tuning.prune_wgrad_configs),
    # Timing the configurations runs the kernel again and again: an accumulating one must find
    # its output as it was each time.
    restore_value=["c_ptr"],
)
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, c_ptr, sizes_ptr,
    num_experts, K, N_OUT,
    stride_am, stride_ak, stride_bm, stride_bn, stride_ce, stride_ck, stride_cn,
    ROWS_PER_EXPERT,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    k_tiles, n_tiles = tl.cdiv(K, BLOCK_K), tl.cdiv(N_OUT, BLOCK_N)
    # Expert-major, so the programs in flight read the same expert's rows.
    expert = pid // (k_tiles * n_tiles)
    tile_k, tile_n = (pid // n_tiles) % k_tiles, pid % n_tiles
    first_row, rows_end = _expert_rows(sizes_ptr, num_experts, expert, E_PAD)
    if ACCUMULATE and first_row == rows_end:
        return  # adding zeros: nothing to read or write
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, col_ok = ks < K, cols < N_OUT
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(first_row, rows_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_end
        rows = rows.to(tl.int64)
        a_t = tl.load(
            a_ptr + rows[None, :] * stride_am + ks[:, None] * stride_ak,
            mask=row_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = _mma(a_t, b, acc, UPCAST)
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + ks[:, None] * stride_ck
    c_ptrs += cols[None, :] * stride_cn
    c_ok = k_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_ok, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def _check(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, widths: int = 1) -> None:
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped GEMM needs x [N, K] and w [E, K, n]; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")  # fmt: skip
    if w.shape[2] % widths:
        raise ValueError(f"the SwiGLU weights need an even width (gate then up); got {w.shape[2]}")
    if group_sizes.shape != (w.shape[0],) or group_sizes.is_floating_point():
        raise ValueError(f"group_sizes must be int [E={w.shape[0]}]; got {group_sizes.dtype} "
                         f"{tuple(group_sizes.shape)}")  # fmt: skip
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype; got {x.dtype} and {w.dtype}")
    if not (x.device == w.device == group_sizes.device):
        raise ValueError(f"x, w, group_sizes on different devices: {x.device}, {w.device}, "
                         f"{group_sizes.device}")  # fmt: skip


def _launch_rows(a, b, group_sizes, out, epilogue=PLAIN, aux=None, n_out=None):
    """``out[rows of e] = a[rows of e] @ b[e]`` with ``epilogue``; ``n_out`` columns per tile
    pass (half of ``b``'s width for SWIGLU). ``aux`` as in the module docstring."""
    num_rows, k = a.shape
    num_experts = b.shape[0]
    n_out = b.shape[2] if n_out is None else n_out
    if num_rows == 0:
        return
    aux = out if aux is None else aux

    def grid(meta):
        row_tiles = triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts
        return (row_tiles * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _grouped_rows_kernel[grid](
        a, b, out, aux, group_sizes,
        num_experts, n_out, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), aux.stride(0), aux.stride(1),
        tuning.rows_per_expert(num_rows, num_experts),
        EPILOGUE=epilogue.value, UPCAST=tuning.INTERPRETING,
        E_PAD=triton.next_power_of_2(num_experts),
    )  # fmt: skip


def grouped_wgrad(a, b, group_sizes, alloc: Alloc = torch.empty, accumulate_into=None):
    """``out[e] = a[rows of e]^T @ b[rows of e]``: ``a [N, K]``, ``b [N, n]`` → ``[E, K, n]``;
    with ``accumulate_into`` (fp32 ``[E, K, n]``), ``accumulate_into[e] += ...`` instead,
    returned."""
    (num_rows, k), n = a.shape, b.shape[1]
    num_experts = group_sizes.shape[0]
    if accumulate_into is None:
        out = alloc((num_experts, k, n), dtype=a.dtype, device=a.device)
    elif accumulate_into.shape != (num_experts, k, n) or accumulate_into.dtype != torch.float32:
        raise ValueError(f"accumulate_into must be fp32 {(num_experts, k, n)}; got "
                         f"{accumulate_into.dtype} {tuple(accumulate_into.shape)}")  # fmt: skip
    else:
        out = accumulate_into

    def grid(meta):
        return (num_experts * triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _grouped_wgrad_kernel[grid](
        a, b, out, group_sizes,
        num_experts, k, n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        tuning.rows_per_expert(num_rows, num_experts),
        ACCUMULATE=accumulate_into is not None, UPCAST=tuning.INTERPRETING,
        E_PAD=triton.next_power_of_2(num_experts),
    )  # fmt: skip
    return out


def weight_gradient(weight, a, b, group_sizes):
    """The gradient autograd gets for ``weight`` from ``a^T b`` per expert. Where megatron-core's
    DDP gave the weight an fp32 ``main_grad``, the kernel adds into it and flags
    ``weight.grad_added_to_main_grad``; the tensor returned then only carries DDP's backward hook
    (which drops it unread), as in megatron-core's own fused linear layers."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not hasattr(weight, "grad_added_to_main_grad"):
        return grouped_wgrad(a, b, group_sizes)
    grouped_wgrad(a, b, group_sizes, accumulate_into=main_grad)
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)


def grouped_rows(a, b, group_sizes, alloc: Alloc = torch.empty):
    """``a [N, K]`` sorted by expert, ``b [E, K, n]`` (any strides) → ``[N, n]``."""
    out = alloc((a.shape[0], b.shape[2]), dtype=a.dtype, device=a.device)
    _launch_rows(a, b, group_sizes, out)
    return out


def swiglu_rows(x, fc1, group_sizes, alloc: Alloc = torch.empty):
    """fc1 with the SwiGLU epilogue: ``(gate_up [N, 2F], hidden [N, F])``."""
    ffn = fc1.shape[2] // 2
    gate_up = alloc((x.shape[0], 2 * ffn), dtype=x.dtype, device=x.device)
    hidden = alloc((x.shape[0], ffn), dtype=x.dtype, device=x.device)
    _launch_rows(x, fc1, group_sizes, gate_up, SWIGLU, aux=hidden, n_out=ffn)
    return gate_up, hidden


def swiglu_backward_rows(grad, fc2, gate_up, group_sizes, alloc: Alloc = torch.empty):
    """fc2's dgrad with the SwiGLU backward epilogue: ``d gate_up [N, 2F]`` from ``grad [N, h]``."""
    out = alloc(gate_up.shape, dtype=grad.dtype, device=grad.device)
    _launch_rows(grad, fc2.transpose(1, 2), group_sizes, out, SWIGLU_BWD, aux=gate_up)
    return out


class GroupedMMFunction(torch.autograd.Function):
    """``grouped_mm`` with the Triton dgrad (transposed weights) and wgrad kernels."""

    @staticmethod
    def forward(ctx, x, w, group_sizes):
        ctx.save_for_backward(x, w, group_sizes)
        return grouped_rows(x, w, group_sizes)

    @staticmethod
    def backward(ctx, grad):
        x, w, group_sizes = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_rows(grad, w.transpose(1, 2), group_sizes)
        if ctx.needs_input_grad[1]:
            grad_w = weight_gradient(w, x, grad, group_sizes)
        return grad_x, grad_w, None


class GroupedSwigluFFNFunction(torch.autograd.Function):
    """The routed experts' SwiGLU FFN; saves ``x``, ``gate_up`` and ``hidden``."""

    @staticmethod
    def forward(ctx, x, fc1, fc2, group_sizes):
        gate_up, hidden = swiglu_rows(x, fc1, group_sizes)
        ctx.save_for_backward(x, fc1, fc2, group_sizes, gate_up, hidden)
        return grouped_rows(hidden, fc2, group_sizes)

    @staticmethod
    def backward(ctx, grad):
        x, fc1, fc2, group_sizes, gate_up, hidden = ctx.saved_tensors
        d_gate_up = swiglu_backward_rows(grad, fc2, gate_up, group_sizes)
        grad_fc2 = weight_gradient(fc2, hidden, grad, group_sizes) if ctx.needs_input_grad[2] else None
        grad_fc1 = weight_gradient(fc1, x, d_gate_up, group_sizes) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_rows(d_gate_up, fc1.transpose(1, 2), group_sizes)
        return grad_x, grad_fc1, grad_fc2, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """See :func:`megatron_emo.kernels.grouped_gemm.reference.grouped_mm`."""
    _check(x, w, group_sizes)
    return GroupedMMFunction.apply(x, w, group_sizes)


def grouped_swiglu_ffn(
    x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """See :func:`megatron_emo.kernels.grouped_gemm.reference.grouped_swiglu_ffn`."""
    _check(x, fc1, group_sizes, widths=2)
    ffn = fc1.shape[2] // 2
    if fc2.shape != (fc1.shape[0], ffn, x.shape[1]) or fc2.dtype != x.dtype:
        raise ValueError(f"fc2 must be [E, F, h] = {(fc1.shape[0], ffn, x.shape[1])} in {x.dtype}; "
                         f"got {tuple(fc2.shape)} {fc2.dtype}")  # fmt: skip
    return GroupedSwigluFFNFunction.apply(x, fc1, fc2, group_sizes)
