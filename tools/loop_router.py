"""A per-document Python-loop router in the style of the original EMO implementation.

For the throughput benchmark's ``loop-router`` case only (not part of the package): same
signature and results as :func:`megatron_emo.kernels.routing.route` (up to ties), but it reads
the segment lengths to the host, then loops over segments, reading each pool size with
``.item()`` and writing the experts outside the pool into a dense ``[T, E]`` mask, as the
reference router does per row and document; then one masked softmax and top-k for all tokens.
"""

import torch


def per_document_loop_route(logits, segment_ids, pool_sizes, topk, *, return_logsumexp=False):
    """Route ``logits`` fp32 ``[T, E]`` (row-major tokens) with per-segment pools.

    Args:
        segment_ids: int64 ``[T]`` non-decreasing dense segment index.
        pool_sizes: int ``[>= num segments]``, segment i's pool at entry i; None: no pool.
        topk: routed experts per token.

    Returns:
        ``(weights, indices, probs)`` ``[T, K]``, ``[T, K]``, ``[T, E]``, and ``logsumexp [T]`` of
        the masked logits with ``return_logsumexp``.
    """
    num_experts = logits.shape[-1]
    drop = torch.zeros_like(logits, dtype=torch.bool)
    if pool_sizes is not None:
        lengths = torch.unique_consecutive(segment_ids, return_counts=True)[1].tolist()
        start = 0
        for segment, length in enumerate(lengths):
            end = start + length
            with torch.no_grad():
                sums = torch.softmax(logits[start:end], dim=-1).sum(dim=0)
                num_drop = num_experts - int(pool_sizes[segment].item())
                if num_drop > 0:
                    drop[start:end, torch.topk(-sums, num_drop).indices] = True
            start = end
    masked = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    weights, indices = torch.topk(probs, topk, dim=-1)
    if return_logsumexp:
        return weights, indices, probs, torch.logsumexp(masked, dim=-1)
    return weights, indices, probs
