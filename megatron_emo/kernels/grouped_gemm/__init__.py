"""Grouped GEMM over expert-sorted rows, and the routed experts' SwiGLU FFN built on it.

``grouped_mm(x, w, group_sizes)`` and ``grouped_swiglu_ffn(x, fc1, fc2, group_sizes)`` follow the
backend rule of every kernel op (:func:`megatron_emo.kernels.backend.select_path`): the Triton
kernels on CUDA (tensor cores for bf16; fp32 runs as exact fp32 products, far slower, for
tests), Triton's interpreter on the CPU under
``TRITON_INTERPRET=1``, the PyTorch reference (a loop over experts) elsewhere
(:func:`megatron_emo.kernels.backend.implementation`, which logs the path once).
"""

import torch

from megatron_emo.kernels.backend import implementation


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over experts: ``out[rows of e] = x[rows of e] @ w[e]``.

    Args:
        x: ``[N, K]`` rows sorted by expert.
        w: ``[E, K, n]`` one matrix per expert.
        group_sizes: int ``[E]`` rows per expert, on x's device (zeros allowed, sum = N; never
            read by the host on CUDA).

    Returns:
        ``[N, n]`` in the dtype of ``x`` (fp32 accumulation). Differentiable in ``x`` and ``w``;
        the weight gradient of an empty expert is exactly zero.
    """
    return implementation("grouped_gemm", x.device).grouped_mm(x, w, group_sizes)


def grouped_swiglu_ffn(
    x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """Each expert's SwiGLU FFN on its rows: ``(silu(x fc1_gate) * (x fc1_up)) fc2``.

    On Triton the SwiGLU runs in fc1's epilogue and its backward in fc2's dgrad epilogue.

    Args:
        x: ``[N, h]`` rows sorted by expert.
        fc1: ``[E, h, 2F]``, the gate columns then the up columns.
        fc2: ``[E, F, h]``.
        group_sizes: int ``[E]`` rows per expert (zeros allowed, sum = N).

    Returns:
        ``[N, h]`` in the dtype of ``x``, differentiable in ``x``, ``fc1`` and ``fc2``.
    """
    return implementation("grouped_gemm", x.device).grouped_swiglu_ffn(x, fc1, fc2, group_sizes)
