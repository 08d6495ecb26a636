"""Document-causal self-attention, ``document_attention``: PyTorch's variable-length flash kernel
on CUDA, the PyTorch reference (SDPA with a dense mask) elsewhere.

Dispatch rule, decided per call from the query's device and dtype (:func:`select_path`):
- CUDA, bf16 or fp16: ``varlen_impl``. If torch's varlen_attn is missing or takes no
  ``window_size`` (checked with torch 2.11 and 2.13) this raises; a GPU run never falls back to
  the dense mask silently.
- CUDA in another dtype (fp32: the flash kernel has none): the reference, which builds the
  dense ``[b, 1, s, s]`` mask; the path line says so.
- Any other device: the reference.
Each path is logged once per process at INFO. Nothing touches CUDA at import.
"""

import importlib
import logging
from types import ModuleType
from typing import Optional

import torch

from megatron_emo.kernels.attention import reference
from megatron_emo.logs import log_once

__all__ = ["document_attention", "select_path"]

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.bfloat16, torch.float16)


def select_path(device: torch.device, dtype: torch.dtype) -> str:
    """``"varlen"`` or ``"reference"``, the implementation for a query on ``device`` in ``dtype``."""
    return "varlen" if device.type == "cuda" and dtype in FLASH_DTYPES else "reference"


def _implementation(query: torch.Tensor) -> ModuleType:
    path = select_path(query.device, query.dtype)
    if path == "reference":
        if query.device.type == "cuda":
            log_once(logger, "document_attention: path = reference on cuda: the flash kernel needs "
                     "bf16 or fp16, not %s, so the dense [b, 1, s, s] mask is built", query.dtype)
        else:
            log_once(logger, "document_attention: path = reference")
        return reference
    log_once(logger, "document_attention: path = varlen")
    try:
        return importlib.import_module("megatron_emo.kernels.attention.varlen_impl")
    except ImportError as error:
        raise RuntimeError(
            "document_attention on cuda needs torch.nn.attention.varlen.varlen_attn with "
            f"window_size (torch 2.11 has it): {error}. There is no silent fallback to the PyTorch "
            "reference."
        ) from error


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal self-attention within documents, in megatron-core's core-attention layout.

    A token attends to itself and the earlier tokens of its document. Documents are the
    segments ``[cu_seqlens[i], cu_seqlens[i+1])`` of the tokens flattened row after row
    (``[b, s]`` order, token ``r*s + p`` is position p of row r); every row start must be a
    boundary, as :func:`megatron_emo.model.document_batch.attention_boundaries` makes them.

    Args:
        query: ``[s, b, n, d]``.
        key, value: ``[s, b, g, d]``, g dividing n (GQA: query head h reads key/value head
            ``h // (n/g)``); same dtype as ``query``.
        cu_seqlens: int32 ``[num_docs + 1]`` on the query's device: 0, the start of every
            document after the first, then ``b*s``.
        max_seqlen: the longest document, or any larger bound such as ``s`` (the flash kernel
            launches work for ``max_seqlen`` positions per document; a bound that is too small
            drops positions, which the reference rejects).
        scale: softmax scale; None is ``1 / sqrt(d)``.

    Returns:
        ``[s, b, n*d]`` contiguous, in the query's dtype; differentiable in query, key and
        value. No dropout.
    """
    impl = _implementation(query)
    return impl.document_attention(query, key, value, cu_seqlens, max_seqlen, scale=scale)
