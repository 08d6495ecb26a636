"""Document-pooled routing, ``route``.

The fused Triton kernels on CUDA, Triton's interpreter under ``TRITON_INTERPRET=1`` (how the CPU
tests exercise the kernels), the PyTorch reference elsewhere
(:func:`megatron_emo.kernels.backend.implementation`, which logs the path once).
"""

from typing import Optional

import torch

from megatron_emo.kernels.backend import implementation

__all__ = ["route"]


def route(
    logits: torch.Tensor,
    segment_ids: Optional[torch.Tensor],
    pool_sizes: Optional[torch.Tensor],
    topk: int,
    *,
    return_logsumexp: bool = False,
):
    """Route tokens to experts inside their document's pool (the routing contract, defined by
    :mod:`megatron_emo.kernels.routing.reference`).

    Exactly :func:`megatron_emo.kernels.routing.reference.route`; see there for the semantics:
    the pool of a segment is the top-P experts of the sum of its tokens' unmasked softmax, ties
    to the lower expert index, chosen without gradient; weights are not renormalised.

    Args:
        logits: ``[T, E]`` router logits (fp32; half types are computed in fp32).
        segment_ids: int ``[T]``, equal id = same segment, segments contiguous. Ignored when
            ``pool_sizes`` is None.
        pool_sizes: int ``[>= N]``, the pool of the i-th segment in order of appearance, each
            ``>= topk``; entries past the last segment are ignored. None means no pool.
        topk: routed experts per token, K.
        return_logsumexp: also return the logsumexp of the masked logits (for the z-loss).

    Returns:
        ``(weights, indices, probs)`` or ``(weights, indices, probs, logsumexp)``: fp32 ``[T, K]``
        (not renormalised), int64 ``[T, K]``, fp32 ``[T, E]`` masked softmax (0 outside the
        pool), fp32 ``[T]`` (fp64 throughout for fp64 logits).
    """
    impl = implementation("routing", logits.device, name="document-pooled routing")
    return impl.route(logits, segment_ids, pool_sizes, topk, return_logsumexp=return_logsumexp)
