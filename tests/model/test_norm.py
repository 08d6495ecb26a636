"""RMSNorm (megatron_emo.model.norm) against the formula computed in fp64: values and gradients,
on the CPU in fp32 and on a GPU in bf16 (PyTorch's fused kernel there)."""

import pytest
import torch

from megatron_emo.model.norm import RMSNorm
from tests.conftest import make_config


def formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.square().mean(dim=-1, keepdim=True) + eps) * weight.double()


def check(device: str, dtype: torch.dtype, rtol: float, atol: float) -> None:
    norm = RMSNorm(make_config(params_dtype=dtype), hidden_size=64).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    x = (torch.randn(5, 3, 64) * 3).to(device=device, dtype=dtype).requires_grad_()
    grad_out = torch.randn(5, 3, 64).to(device=device, dtype=dtype)
    out = norm(x)
    assert out.dtype == dtype
    out.backward(grad_out)
    x_ref = x.detach().double().requires_grad_()
    weight_ref = norm.weight.detach().double().requires_grad_()
    expected = formula(x_ref, weight_ref, norm.eps)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(norm.weight.grad.double(), weight_ref.grad, rtol=rtol, atol=atol * 15)


def test_values_and_gradients_follow_the_formula_in_fp32():
    check("cpu", torch.float32, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bf16_on_gpu_keeps_fp32_arithmetic():
    # bf16 in and out, fp32 inside: within two bf16 roundings (2^-7) of the exact values, where
    # bf16 arithmetic would lose more over the 64-wide mean.
    check("cuda", torch.bfloat16, rtol=2**-7, atol=2**-7)
