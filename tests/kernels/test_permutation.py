"""The fused permutation kernels (megatron_emo.kernels.permutation) against the PyTorch reference.

``triton_interpret`` tests run the kernels in Triton's interpreter at small shapes (4 rows and 16
columns per program), or natively on a GPU. Data movement (the permuted rows, the group sizes,
the order) must be bitwise equal; the weighted sums and gradients equal within fp32 rounding.
The reference itself is tested against explicit loops in tests/kernels/test_permutation_order.py.
"""

import logging

import pytest
import torch

from megatron_emo.kernels import permutation
from megatron_emo.kernels.permutation import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def impl():
    from megatron_emo.kernels.permutation import triton_impl

    return triton_impl


# Each row: (T, E, K, h), the edge case in the comment.
CASES = {
    "one token": (1, 4, 2, 16),
    "T and h off the blocks": (7, 5, 2, 37),
    "prime E, K = 3": (37, 7, 3, 20),
    "K = E": (9, 4, 4, 16),
    "all tokens to one expert": (11, 6, 1, 33),
}


def make_inputs(case, dtype=torch.float32):
    """tokens ``[T, h]``, distinct experts per token ``[T, K]``, fp32 gate weights ``[T, K]``."""
    num_tokens, num_experts, topk, hidden = CASES[case]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    tokens = torch.randn(num_tokens, hidden, generator=gen).to(DEVICE, dtype)
    if case == "all tokens to one expert":
        indices = torch.full((num_tokens, 1), 3)
    else:
        indices = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=-1).indices
    weights = torch.rand(num_tokens, topk, generator=gen)
    return tokens, indices.to(DEVICE), weights.to(DEVICE), num_experts


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_is_bitwise_the_reference(impl, case, dtype):
    tokens, indices, _, num_experts = make_inputs(case, dtype)
    for a, b in zip(impl.permute(tokens, indices, num_experts), reference.permute(tokens, indices, num_experts)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
def test_unpermute_and_gradients_match_reference(impl, case):
    """Forward, and the gradients of tokens (through permute) and of the gate weights."""
    tokens, indices, weights, num_experts = make_inputs(case)
    scale = torch.rand(indices.numel(), 1, device=DEVICE)  # a stand-in for the experts

    def run(module):
        x, w = tokens.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        rows, _, order = module.permute(x, indices, num_experts)
        out = module.unpermute(rows * scale, w, order)
        out.backward(grad_out)
        return out, x.grad, w.grad

    grad_out = torch.randn(tokens.shape, device=DEVICE)
    for a, b in zip(run(impl), run(reference)):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.triton_interpret
def test_bf16_sums_in_fp32_and_top1_unit_weights_round_trip(impl):
    tokens, indices, weights, num_experts = make_inputs("prime E, K = 3", torch.bfloat16)
    rows, _, order = impl.permute(tokens, indices, num_experts)
    out = impl.unpermute(rows, weights, order)
    expected = tokens.double() * weights.double().sum(-1, keepdim=True)
    assert out.dtype == torch.bfloat16
    # One bf16 rounding of an fp32 sum (the interpreter truncates: up to one unit in the last place).
    torch.testing.assert_close(out.double(), expected, rtol=2**-7, atol=1e-6)
    tokens, indices, _, num_experts = make_inputs("all tokens to one expert", torch.bfloat16)
    rows, _, order = impl.permute(tokens, indices, num_experts)
    assert torch.equal(impl.unpermute(rows, torch.ones(len(tokens), 1, device=DEVICE), order), tokens)


@pytest.mark.triton_interpret
def test_no_tokens(impl):
    indices = torch.zeros(0, 2, dtype=torch.int64, device=DEVICE)  # [T=0, K=2]
    rows, sizes, order = impl.permute(torch.randn(0, 4, device=DEVICE), indices, 3)
    assert rows.shape == (0, 4) and sizes.tolist() == [0, 0, 0] and order.numel() == 0
    assert impl.unpermute(rows, torch.zeros(0, 2, device=DEVICE), order).shape == (0, 4)


def test_cpu_runs_the_reference_and_logs_it_once(monkeypatch, caplog):
    from megatron_emo import logs

    monkeypatch.setattr(logs, "_logged_once", set())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tokens, indices, weights, num_experts = (t.cpu() if torch.is_tensor(t) else t for t in make_inputs("K = E"))
    with caplog.at_level(logging.INFO, logger="megatron_emo.kernels.backend"):
        rows, _, order = permutation.permute(tokens, indices, num_experts)
        permutation.unpermute(rows, weights, order)
    assert torch.equal(rows, reference.permute(tokens, indices, num_experts)[0])
    assert [r.getMessage() for r in caplog.records] == ["permutation: path = reference"]
