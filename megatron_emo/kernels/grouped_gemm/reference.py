"""Pure-PyTorch reference of ``megatron_emo.kernels.grouped_gemm``: a loop over experts.

Legend: N expert rows (sorted by expert), E experts, K and n the inner and output widths,
h the model width, F the expert FFN width.

It is the CPU path of the routed experts and the oracle of the Triton kernels' tests. Autograd
differentiates it directly; it supports float64 for gradient checks.
"""

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """:func:`megatron_emo.kernels.grouped_gemm.grouped_mm`, one matmul per expert."""
    chunks = x.split(group_sizes.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks)])


def grouped_swiglu_ffn(
    x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """:func:`megatron_emo.kernels.grouped_gemm.grouped_swiglu_ffn` on :func:`grouped_mm`."""
    gate, up = grouped_mm(x, fc1, group_sizes).chunk(2, dim=-1)
    return grouped_mm(F.silu(gate) * up, fc2, group_sizes)
