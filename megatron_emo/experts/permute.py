"""Dispatch and combine on one rank: tokens to expert-sorted rows and back.

Legend: T tokens, K routed top-k, E experts, N = T*K expert rows.

    tokens [T, h] --sort (token, slot) pairs by expert--> rows [N, h], tokens_per_expert [E]
    expert output [N, h] --× gate weight, scatter-add by token--> [T, h]

No Python loop over experts and no host synchronisation: counts stay on the device.
"""

import torch


def tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[E]``: how many top-k slots chose each expert (``indices`` int64 ``[T, K]``).

    A scatter-add rather than ``bincount``, which syncs with the host on CUDA.
    """
    flat = indices.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def permute(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """Gather every (token, slot) pair into expert-sorted order.

    Args:
        tokens: ``[T, h]``.
        indices: int64 ``[T, K]`` chosen experts.

    Returns:
        ``(rows, group_sizes, order)``: ``[N, h]`` rows sorted by expert (stable, so by token
        within an expert), int64 ``[E]`` rows per expert, and int64 ``[N]`` the flat (token, slot)
        index of each row.
    """
    order = torch.argsort(indices.flatten(), stable=True)
    rows = tokens.index_select(0, order // indices.shape[1])
    return rows, tokens_per_expert(indices, num_experts), order


def unpermute(rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Weight the expert outputs by their gates and sum them back per token.

    Args:
        rows: ``[N, h]`` expert outputs in the order of :func:`permute`.
        weights: fp32 ``[T, K]`` gate weights.
        order: int64 ``[N]`` from :func:`permute`.

    Returns:
        ``[T, h]`` in the dtype of ``rows``, accumulated in at least fp32.
    """
    num_tokens, topk = weights.shape
    gates = weights.flatten().index_select(0, order)
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    weighted = rows.to(accumulate) * gates[:, None]
    combined = torch.zeros(num_tokens, rows.shape[-1], dtype=accumulate, device=rows.device)
    return combined.index_add_(0, order // topk, weighted).to(rows.dtype)
