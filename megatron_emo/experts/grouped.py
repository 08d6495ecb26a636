"""Grouped matrix product for expert-sorted rows: ``out[rows of e] = x[rows of e] @ w[e]``.

On CUDA with bf16 it is ``torch._grouped_mm`` (one kernel, group sizes stay on the device); the
reference loops over experts and is the CPU path (and supports float64 for gradient checks).
Which path runs is logged once.
"""

import logging

import torch

from megatron_emo.logs import log_once

logger = logging.getLogger(__name__)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Per-expert loop. ``x [N, k]`` sorted by expert, ``w [E, k, n]``, ``group_sizes`` int ``[E]``."""
    chunks = x.split(group_sizes.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks)])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over experts.

    Args:
        x: ``[N, k]`` rows sorted by expert.
        w: ``[E, k, n]`` one matrix per expert.
        group_sizes: int ``[E]`` rows per expert (zeros allowed, sum = N).

    Returns:
        ``[N, n]`` in the dtype of ``x``.
    """
    if x.is_cuda and x.dtype == torch.bfloat16:
        log_once(logger, "routed experts: grouped GEMM path = %s", "torch._grouped_mm")
        offsets = group_sizes.cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x, w, offs=offsets)
    if x.is_cuda:
        raise NotImplementedError(
            f"routed experts on CUDA need bf16 (got {x.dtype}): torch._grouped_mm is bf16-only "
            "and the per-expert loop is far too slow for GPU training; train with bf16=True"
        )
    log_once(logger, "routed experts: grouped GEMM path = %s", "per-expert reference loop (CPU)")
    return grouped_mm_reference(x, w, group_sizes)
