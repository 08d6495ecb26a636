"""Document-pooled routing, ``route``: the Triton kernels on CUDA, the PyTorch reference elsewhere.

Dispatch rule, decided per call from the logits' device:
- CUDA tensors: the Triton implementation. If triton cannot be imported this raises; a GPU run
  never falls back to the (slower) reference silently.
- Any other device: the reference, unless the environment has ``TRITON_INTERPRET=1``; then the
  Triton implementation runs in Triton's interpreter, which is how the CPU tests exercise the
  kernels. Triton reads the variable when the kernels are defined, so it must be set before
  the first Triton call of the process (in practice: in the environment of a separate pytest
  process).
Each path is logged once per process at INFO.
"""

import logging
from typing import Optional

import torch

from megatron_emo.kernels.dispatch import select_path
from megatron_emo.kernels.routing import reference
from megatron_emo.logs import log_once

__all__ = ["route", "select_path"]

logger = logging.getLogger(__name__)


def _triton_impl():
    """The Triton module, imported on first use so that CPU runs never need triton."""
    try:
        from megatron_emo.kernels.routing import triton_impl
    except ImportError as error:
        raise RuntimeError(
            "document-pooled routing on CUDA needs triton, which failed to import "
            f"({error}); install triton. There is no silent fallback to the PyTorch reference."
        ) from error
    return triton_impl


def route(
    logits: torch.Tensor,
    segment_ids: Optional[torch.Tensor],
    pool_sizes: Optional[torch.Tensor],
    topk: int,
    *,
    return_logsumexp: bool = False,
):
    """Route tokens to experts inside their document's pool (the routing contract, defined by
    :mod:`megatron_emo.routing.reference`).

    Exactly :func:`megatron_emo.routing.reference.route`; see there for the semantics: the pool
    of a segment is the top-P experts of the sum of its tokens' unmasked softmax, ties to the
    lower expert index, chosen without gradient; weights are not renormalised.

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
    path = select_path(logits.device)
    impl = reference if path == "reference" else _triton_impl()
    log_once(logger, "document-pooled routing: path = %s", path)
    return impl.route(logits, segment_ids, pool_sizes, topk, return_logsumexp=return_logsumexp)
