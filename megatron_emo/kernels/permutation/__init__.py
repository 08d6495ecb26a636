"""Dispatch and combine on one rank: ``permute`` tokens into expert-sorted rows and ``unpermute``
the expert outputs back, gate-weighted.

Fused Triton kernels on CUDA, Triton's interpreter under ``TRITON_INTERPRET=1``, the PyTorch
reference elsewhere (:func:`megatron_emo.kernels.backend.implementation`, which logs the path
once). Both paths give the same rows in the same order, bitwise; neither loops over experts in
Python nor synchronises with the host.
"""

import torch

from megatron_emo.kernels.backend import implementation
from megatron_emo.kernels.permutation.reference import tokens_per_expert

__all__ = ["permute", "unpermute", "tokens_per_expert"]


def permute(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """Gather every (token, slot) pair into expert-sorted order.

    Args:
        tokens: ``[T, h]``.
        indices: int64 ``[T, K]`` chosen experts, each in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        ``(rows, group_sizes, order)``: ``[N = T*K, h]`` rows sorted by expert (stable, so by
        token within an expert), int64 ``[E]`` rows per expert, and int64 ``[N]`` the flat
        (token, slot) index of each row. ``rows`` is differentiable in ``tokens``.
    """
    return implementation("permutation", tokens.device).permute(tokens, indices, num_experts)


def unpermute(rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Weight the expert outputs by their gates and sum them back per token.

    Args:
        rows: ``[N, h]`` expert outputs in the order of :func:`permute`.
        weights: fp32 ``[T, K]`` gate weights.
        order: int64 ``[N]`` from :func:`permute`.

    Returns:
        ``[T, h]`` in the dtype of ``rows``, accumulated in fp32; differentiable in ``rows``
        and ``weights``.
    """
    return implementation("permutation", rows.device).unpermute(rows, weights, order)
