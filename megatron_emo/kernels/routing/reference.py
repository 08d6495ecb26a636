"""Pure-PyTorch reference of ``megatron_emo.kernels.routing``: document-pooled routing, the
routing contract every fast kernel is tested against.

Legend: T tokens, E routed experts, K routed top-k, N segments.

    logits [T, E] --softmax--> per-segment sums D [N, E] --top-P of D per segment--> pool mask
    masked logits --softmax--> probs [T, E] --top-K--> weights, indices [T, K]  (no renormalisation)

The pool choice is not differentiated (as in the method); gradients flow through the masked
softmax only. Vectorised throughout: no loop over segments, no host synchronisation.
"""

from typing import Optional

import torch

from megatron_emo.kernels.routing.segments import segment_ordinals, segment_starts


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half types to fp32; fp32 and fp64 stay (fp64 serves gradient checks)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pool_mask(
    logits: torch.Tensor, segment_ids: torch.Tensor, pool_sizes: torch.Tensor
) -> torch.Tensor:
    """Which experts each token may use: the top-``P`` of its segment's summed probabilities.

    Ties in the summed probabilities go to the lower expert index (a stable sort), so the pool
    is deterministic on every device.

    Args:
        logits: fp32 ``[T, E]`` router logits.
        segment_ids: int ``[T]``, contiguous segments.
        pool_sizes: int ``[>= N]``, pool of the i-th segment in order of appearance; entries
            past the last segment are ignored. ``P >= E`` keeps every expert.

    Returns:
        bool ``[T, E]``, True where the expert is in the token's pool.
    """
    num_experts = logits.shape[-1]
    seg = segment_ordinals(segment_starts(segment_ids))
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        sums = torch.zeros(pool_sizes.shape[0], num_experts, dtype=probs.dtype, device=probs.device)
        sums.index_add_(0, seg, probs)
        order = torch.sort(sums, dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(num_experts, device=order.device).expand_as(order))
        in_pool = ranks < pool_sizes.to(ranks.device)[:, None]
    return in_pool[seg]


def route(
    logits: torch.Tensor,
    segment_ids: Optional[torch.Tensor],
    pool_sizes: Optional[torch.Tensor],
    topk: int,
    *,
    return_logsumexp: bool = False,
):
    """Route tokens to experts inside their document's pool.

    Args:
        logits: fp32 ``[T, E]`` router logits over the routed experts.
        segment_ids: int ``[T]``, equal id = same document segment; segments are contiguous.
            Ignored when ``pool_sizes`` is None.
        pool_sizes: int ``[>= N]``, the pool of the i-th distinct segment in order (entries past
            the last segment are ignored), each ``>= topk``; None means no pool (standard top-k).
        topk: routed experts per token, K.
        return_logsumexp: also return the logsumexp of the masked logits (for the z-loss).

    Returns:
        ``(weights, indices, probs)``, or ``(weights, indices, probs, logsumexp)``:
        weights fp32 ``[T, K]`` (softmax values, not renormalised), indices int64 ``[T, K]``,
        probs fp32 ``[T, E]`` the masked softmax (0 outside the pool), logsumexp fp32 ``[T]``.
    """
    logits = at_least_fp32(logits)
    if pool_sizes is not None:
        logits = logits.masked_fill(~pool_mask(logits, segment_ids, pool_sizes), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, topk, dim=-1)
    if return_logsumexp:
        return weights, indices, probs, torch.logsumexp(logits, dim=-1)
    return weights, indices, probs
