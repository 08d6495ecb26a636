"""The Triton grouped GEMM and SwiGLU expert FFN (megatron_emo.kernels.grouped_gemm) against the
per-expert PyTorch reference.

Three tiers:
- unmarked (CPU): the reference against explicit products, the backend rule and its log line;
- ``triton_interpret``: the kernels at small shapes in Triton's interpreter (block 16), or
  natively on a GPU: odd widths, rows off the block, empty experts, all rows on one expert, a
  single row, gradients against autograd through the reference, poisoned padding;
- ``gpu``: the EMO shape (131072 rows, 128 experts, h 2048, F 1024) under uniform, Zipf-skewed
  and mostly-empty loads; bf16 error at most twice PyTorch's own bf16 error.
fp32 inputs are compared tightly (the interpreter computes fp32 dots exactly); bf16 outputs by
the project's bf16 rule: error against an fp32 reference of the same bf16 inputs at most 2x that of
PyTorch's bf16 computation, plus a floor.
"""

import logging
import math

import pytest
import torch

from megatron_emo.kernels import grouped_gemm
from megatron_emo.kernels.grouped_gemm import reference
from megatron_emo.kernels.grouped_gemm.tuning import INTERPRETING
from megatron_emo.testing.expert_loads import KINDS, group_sizes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def impl():
    """The Triton module, imported only by the tests that run it (after TRITON_INTERPRET is set)."""
    from megatron_emo.kernels.grouped_gemm import triton_impl

    return triton_impl


# Each row: (rows per expert, K, n), the edge case in the comment; tiles are 16 x 16 x 16 in the
# interpreter.
CASES = {
    "odd K and n, empty experts": ([3, 0, 17, 1, 0, 20], 37, 23),
    "rows off the block, K a multiple of it": ([5, 33, 18], 32, 48),
    "all rows to one expert": ([0, 0, 41, 0], 20, 17),
    "a single row": ([0, 1, 0], 16, 16),
    "prime E = 7, one empty": ([9, 2, 0, 16, 7, 30, 1], 24, 40),
}


def make_inputs(case, dtype=torch.float32, widths=1):
    """``x [N, K]``, ``w [E, K, widths * n]`` (scaled by 1/sqrt(K)), ``group_sizes`` int64."""
    sizes, k, n = CASES[case]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    x = torch.randn(sum(sizes), k, generator=gen)
    w = torch.randn(len(sizes), k, widths * n, generator=gen) / math.sqrt(k)
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), torch.tensor(sizes, device=DEVICE)


def make_fc2(case, dtype=torch.float32):
    sizes, k, n = CASES[case]
    gen = torch.Generator().manual_seed(100 + sorted(CASES).index(case))
    return (torch.randn(len(sizes), n, k, generator=gen) / math.sqrt(n)).to(DEVICE, dtype)


def explicit(x, w, sizes):
    """fp64 products, expert by expert."""
    starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
    return torch.cat([x[a:b].double() @ w[e].double() for e, (a, b) in enumerate(zip(starts, starts[1:]))])


def gradients(fn, inputs, grad_out):
    """Gradients of ``sum(fn(*inputs) * grad_out)`` w.r.t. every floating input."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    fn(*leaves).backward(grad_out)
    return [t.grad for t in leaves if t.is_floating_point()]


ROUNDING = 2.0 if INTERPRETING and DEVICE == "cpu" else 1.0
"""Triton's interpreter converts fp32 to bf16 by truncation (whatever rounding is asked for), a
rounding error up to one unit in the last place where the GPU's round-to-nearest makes half."""


def assert_within_twice_bf16_error(ours, pytorch_bf16, exact, floor=1e-3):
    worst = float((ours.double() - exact).abs().max())
    bound = 2 * ROUNDING * float((pytorch_bf16.double() - exact).abs().max()) + floor
    assert worst <= bound, f"max error {worst:.3g} > 2 x PyTorch's bf16 error + floor = {bound:.3g}"


# ---------------------------------------------------------------- reference (CPU)


def test_reference_matches_explicit_products():
    x, w, sizes = (t.cpu() for t in make_inputs("odd K and n, empty experts", torch.float64))
    torch.testing.assert_close(reference.grouped_mm(x, w, sizes), explicit(x, w, sizes.tolist()))


def test_reference_swiglu_ffn_is_silu_gate_times_up_then_fc2():
    x, fc1, sizes = (t.cpu() for t in make_inputs("prime E = 7, one empty", torch.float64, widths=2))
    fc2 = make_fc2("prime E = 7, one empty", torch.float64).cpu()
    gate, up = explicit(x, fc1, sizes.tolist()).chunk(2, dim=-1)
    expected = explicit(torch.nn.functional.silu(gate) * up, fc2, sizes.tolist())
    torch.testing.assert_close(reference.grouped_swiglu_ffn(x, fc1, fc2, sizes), expected)


# ---------------------------------------------------------------- Triton, small shapes


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(impl, case):
    x, w, sizes = make_inputs(case)
    torch.testing.assert_close(impl.grouped_mm(x, w, sizes), reference.grouped_mm(x, w, sizes), **FP32)
    xb, wb = x.bfloat16(), w.bfloat16()
    out = impl.grouped_mm(xb, wb, sizes)
    assert out.dtype == torch.bfloat16
    exact = explicit(xb, wb, sizes.tolist())
    assert_within_twice_bf16_error(out, reference.grouped_mm(xb, wb, sizes), exact)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm_gradients_match_reference_autograd(impl, case):
    x, w, sizes = make_inputs(case)
    grad_out = torch.randn(x.shape[0], w.shape[2], device=DEVICE)
    ours = gradients(impl.grouped_mm, (x, w, sizes), grad_out)
    for a, b in zip(ours, gradients(reference.grouped_mm, (x, w, sizes), grad_out)):
        torch.testing.assert_close(a, b, **FP32)
    empty = sizes == 0
    assert bool((ours[1][empty] == 0).all()), "an empty expert's weight gradient must be exactly 0"


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
def test_swiglu_ffn_forward_and_gradients_match_reference(impl, case):
    x, fc1, sizes = make_inputs(case, widths=2)
    fc2 = make_fc2(case)
    inputs = (x, fc1, fc2, sizes)
    torch.testing.assert_close(
        impl.grouped_swiglu_ffn(*inputs), reference.grouped_swiglu_ffn(*inputs), **FP32
    )
    grad_out = torch.randn(x.shape, device=DEVICE)
    ours = gradients(impl.grouped_swiglu_ffn, inputs, grad_out)
    for a, b in zip(ours, gradients(reference.grouped_swiglu_ffn, inputs, grad_out)):
        torch.testing.assert_close(a, b, **FP32)
    empty = sizes == 0
    assert bool((ours[1][empty] == 0).all()) and bool((ours[2][empty] == 0).all())


@pytest.mark.triton_interpret
def test_swiglu_ffn_bf16_within_twice_pytorch_bf16_error(impl):
    case = "odd K and n, empty experts"
    x, fc1, sizes = make_inputs(case, torch.bfloat16, widths=2)
    fc2 = make_fc2(case, torch.bfloat16)
    inputs = (x, fc1, fc2, sizes)
    exact = reference.grouped_swiglu_ffn(*(t.double() if t.is_floating_point() else t for t in inputs))
    out = impl.grouped_swiglu_ffn(*inputs)
    assert out.dtype == torch.bfloat16
    assert_within_twice_bf16_error(out, reference.grouped_swiglu_ffn(*inputs), exact)


def poisoned(shape, *, dtype, device):
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def nan_padded(t, pad=3):
    """``t`` as a strided view into a larger NaN-filled buffer (every dimension but the first
    padded): a read past any edge brings NaN into the result."""
    big = torch.full([t.shape[0]] + [s + pad for s in t.shape[1:]], math.nan, dtype=t.dtype, device=t.device)
    view = big[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])]
    view.copy_(t)
    return view


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", ["odd K and n, empty experts", "rows off the block, K a multiple of it"])
def test_nan_padding_never_leaks_and_every_output_is_written(impl, case):
    """Inputs inside NaN-padded storage, outputs allocated NaN: results bitwise equal to clean,
    contiguous runs, and finite."""
    x, fc1, sizes = make_inputs(case, torch.bfloat16, widths=2)
    fc2 = make_fc2(case, torch.bfloat16)
    grad = torch.randn(x.shape, device=DEVICE).bfloat16()
    gate_up, hidden = impl.swiglu_rows(x, fc1, sizes)
    runs = {
        "fc1 + SwiGLU": lambda a, **kw: impl.swiglu_rows(a(x), a(fc1), sizes, **kw),
        "fc2": lambda a, **kw: impl.grouped_rows(a(hidden), a(fc2), sizes, **kw),
        "fc2 dgrad + SwiGLU backward": lambda a, **kw: impl.swiglu_backward_rows(
            a(grad), a(fc2), a(gate_up), sizes, **kw),
        "fc1 dgrad": lambda a, **kw: impl.grouped_rows(a(gate_up), a(fc1).transpose(1, 2), sizes, **kw),
        "fc1 wgrad": lambda a, **kw: impl.grouped_wgrad(a(x), a(gate_up), sizes, **kw),
    }  # fmt: skip
    for name, run in runs.items():
        clean = run(lambda t: t.contiguous())
        dirty = run(nan_padded, alloc=poisoned)
        for a, b in zip(clean if isinstance(clean, tuple) else [clean], dirty if isinstance(dirty, tuple) else [dirty]):
            assert bool(a.isfinite().all()), name
            assert torch.equal(a, b), name


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wgrad_accumulates_into_fp32(impl, dtype):
    """``accumulate_into``: every expert's product added to what the fp32 buffer held, an empty
    expert's part left bit for bit."""
    case = "odd K and n, empty experts"
    x, _, sizes = make_inputs(case, dtype)
    grad = torch.randn(x.shape[0], 29, device=DEVICE).to(dtype)
    held = torch.randn(len(CASES[case][0]), x.shape[1], 29, device=DEVICE)
    total = held.clone()
    assert impl.grouped_wgrad(x, grad, sizes, accumulate_into=total) is total
    fresh = impl.grouped_wgrad(x.float(), grad.float(), sizes)
    torch.testing.assert_close(total, held + fresh, **FP32)
    empty = sizes == 0
    assert torch.equal(total[empty], held[empty])
    with pytest.raises(ValueError, match="accumulate_into must be fp32"):
        impl.grouped_wgrad(x, grad, sizes, accumulate_into=held.double())


@pytest.mark.triton_interpret
@pytest.mark.parametrize("ffn", ["grouped_mm", "grouped_swiglu_ffn"])
def test_weights_with_main_grad_accumulate_there(impl, ffn):
    """megatron-core DDP's contract (its gradient-accumulation fusion): a weight with an fp32
    ``main_grad`` and ``grad_added_to_main_grad`` gets each backward's gradient added into
    ``main_grad`` by the kernel, and the flag set; micro-batch after micro-batch."""
    case = "prime E = 7, one empty"
    swiglu = ffn == "grouped_swiglu_ffn"
    x, fc1, sizes = make_inputs(case, widths=2 if swiglu else 1)
    weights = (fc1, make_fc2(case)) if swiglu else (fc1,)
    grad_out = torch.randn(x.shape[0], x.shape[1] if swiglu else fc1.shape[2], device=DEVICE)
    expected = gradients(getattr(reference, ffn), (x, *weights, sizes), grad_out)[1:]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for param in params:
        param.main_grad = torch.zeros_like(param, dtype=torch.float32)
        param.grad_added_to_main_grad = False
    for _ in range(2):
        getattr(impl, ffn)(x, *params, sizes).backward(grad_out)
    for param, grad in zip(params, expected):
        assert param.grad_added_to_main_grad
        torch.testing.assert_close(param.main_grad, 2 * grad, **FP32)


@pytest.mark.triton_interpret
def test_no_rows_and_int32_group_sizes(impl):
    x, w, sizes = make_inputs("a single row")
    out = impl.grouped_mm(x[:0], w, torch.zeros(3, dtype=torch.int32, device=DEVICE))
    assert out.shape == (0, 16)
    w = w.clone().requires_grad_(True)
    impl.grouped_mm(x[:0], w, torch.zeros(3, dtype=torch.int64, device=DEVICE)).sum().backward()
    assert bool((w.grad == 0).all())
    torch.testing.assert_close(impl.grouped_mm(x, w, sizes.int()), reference.grouped_mm(x, w, sizes), **FP32)


@pytest.mark.triton_interpret
def test_bad_arguments_are_refused(impl):
    x, w, sizes = make_inputs("a single row")
    with pytest.raises(ValueError, match="x \\[N, K\\]"):
        impl.grouped_mm(x[:, :5], w, sizes)
    with pytest.raises(ValueError, match="group_sizes"):
        impl.grouped_mm(x, w, sizes[:2])
    with pytest.raises(ValueError, match="fc2"):
        impl.grouped_swiglu_ffn(x, torch.cat([w, w], 2), w[:, :, :8], sizes)


# ---------------------------------------------------------------- backend (CPU, no Triton run)


def test_cpu_runs_the_reference_and_logs_it_once(monkeypatch, caplog):
    from megatron_emo import logs

    monkeypatch.setattr(logs, "_logged_once", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, sizes = (t.cpu() for t in make_inputs("a single row"))
    with caplog.at_level(logging.INFO, logger="megatron_emo.kernels.backend"):
        for _ in range(2):
            out = grouped_gemm.grouped_mm(x, w, sizes)
    assert torch.equal(out, reference.grouped_mm(x, w, sizes))
    assert [r.getMessage() for r in caplog.records] == ["grouped_gemm: path = reference"]


# ---------------------------------------------------------------- EMO shape on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("load", KINDS)
def test_emo_shape_swiglu_ffn_on_gpu(load):
    """131072 rows (16384 tokens x top-8) on 128 experts, h 2048, F 1024, forward and the three
    gradients, each within twice PyTorch's bf16 error (torch._grouped_mm) of an fp32 reference."""
    rows, experts, hidden, ffn = 131072, 128, 2048, 1024
    gen = torch.Generator().manual_seed(0)
    sizes = group_sizes(load, rows, experts).cuda()
    x = torch.randn(rows, hidden, generator=gen).cuda().bfloat16()
    fc1 = (torch.randn(experts, hidden, 2 * ffn, generator=gen) / hidden**0.5).cuda().bfloat16()
    fc2 = (torch.randn(experts, ffn, hidden, generator=gen) / ffn**0.5).cuda().bfloat16()
    grad_out = torch.randn(rows, hidden, generator=gen).cuda().bfloat16()
    offsets = sizes.cumsum(0).int()

    def torch_ffn(x, fc1, fc2, sizes):
        gate, up = torch._grouped_mm(x, fc1, offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(torch.nn.functional.silu(gate) * up, fc2, offs=offsets)

    inputs = (x, fc1, fc2, sizes)
    fp32 = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    results = {
        name: (fn(*args).detach(), *gradients(fn, args, grad_out.to(args[0].dtype)))
        for name, fn, args in (
            ("ours", grouped_gemm.grouped_swiglu_ffn, inputs),
            ("torch", torch_ffn, inputs),
            ("fp32", reference.grouped_swiglu_ffn, fp32),
        )
    }
    for i, what in enumerate(["out", "grad x", "grad fc1", "grad fc2"]):
        ours, torch_bf16, exact = (results[n][i] for n in ("ours", "torch", "fp32"))
        assert bool(ours.isfinite().all()), what
        scale = float(exact.abs().max())
        assert_within_twice_bf16_error(ours.float(), torch_bf16.float(), exact, floor=1e-3 * scale)
    empty = sizes == 0
    assert bool((results["ours"][2][empty] == 0).all()) and bool((results["ours"][3][empty] == 0).all())
