"""Pure-PyTorch reference of ``megatron_emo.kernels.permutation``: dispatch and combine on one
rank, tokens to expert-sorted rows and back.

Legend: T tokens, K routed top-k, E experts, N = T*K expert rows, h hidden width.

    tokens [T, h] --sort (token, slot) pairs by expert--> rows [N, h], tokens_per_expert [E]
    expert output [N, h] --× gate weight, scatter-add by token--> [T, h]

No Python loop over experts and no host synchronisation: counts stay on the device. It is the
CPU path of the MoE layer and the oracle of the Triton kernels' tests.
"""

import torch


def tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[E]``: how many top-k slots chose each expert (``indices`` int64 ``[T, K]``).

    A scatter-add rather than ``bincount``, which syncs with the host on CUDA.
    """
    flat = indices.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(indices: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: the flat (token, slot) indices in expert order, stable (by token within an
    expert)."""
    return torch.argsort(indices.flatten(), stable=True)


def permute(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int):
    """:func:`megatron_emo.kernels.permutation.permute`: a stable sort, ``index_select``."""
    order = sort_by_expert(indices)
    rows = tokens.index_select(0, order // indices.shape[1])
    return rows, tokens_per_expert(indices, num_experts), order


def unpermute(rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """:func:`megatron_emo.kernels.permutation.unpermute`: ``index_add`` in fp32 (or wider)."""
    num_tokens, topk = weights.shape
    gates = weights.flatten().index_select(0, order)
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    weighted = rows.to(accumulate) * gates[:, None]
    combined = torch.zeros(num_tokens, rows.shape[-1], dtype=accumulate, device=rows.device)
    return combined.index_add_(0, order // topk, weighted).to(rows.dtype)
