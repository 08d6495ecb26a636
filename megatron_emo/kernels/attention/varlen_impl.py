"""``document_attention`` on PyTorch's variable-length flash kernel,
``torch.nn.attention.varlen.varlen_attn`` (CUDA, bf16 or fp16).

Legend: s positions per row, b rows, n query heads, g key/value heads (g divides n), d head
width, T = b*s tokens.

    query [s, b, n, d], key/value [s, b, g, d]
      --transpose to token order, one copy each (a view when b = 1)--> [T, n | g, d]
      --varlen_attn, causal (window (-1, 0)) within each cu_seqlens segment--> [T, n, d]
      --one copy--> [s, b, n*d]

varlen_attn wants one stride between consecutive tokens and each document contiguous, which
``[s, b]`` order breaks for b > 1: hence the copies, each one read and one write of the tensor,
small next to the attention itself.

GQA is native to the flash kernel: query head h reads key/value head h // (n/g), megatron-core's
grouping, and the backward sums dk, dv over each group. Torch releases whose varlen_attn checks
the head counts take ``enable_gqa``; torch 2.11 has no such argument and takes g < n as is.

Autograd is varlen_attn's own (its flash backward). No dropout: varlen_attn fixes it to 0.
"""

import inspect
from typing import Optional

import torch

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError as error:
    raise ImportError(f"torch {torch.__version__} has no torch.nn.attention.varlen ({error})") from error

_PARAMETERS = inspect.signature(varlen_attn).parameters
if "window_size" not in _PARAMETERS:
    raise ImportError(
        f"torch {torch.__version__}'s varlen_attn has no window_size, how torch 2.11 asks for "
        "causal attention"
    )
_GQA = {"enable_gqa": True} if "enable_gqa" in _PARAMETERS else {}

CAUSAL = (-1, 0)
"""varlen_attn's window (left, right) for causal attention: no left limit, nothing to the right.
A tuple: varlen_attn compares it with ``==`` to ``(-1, 0)``."""


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """:func:`megatron_emo.kernels.attention.document_attention` on varlen_attn."""
    seq_len, batch, heads, dim = query.shape
    q, k, v = (t.transpose(0, 1).reshape(batch * seq_len, t.shape[2], dim) for t in (query, key, value))
    gqa = _GQA if k.shape[1] != heads else {}
    out = varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=CAUSAL, **gqa
    )
    return out.view(batch, seq_len, heads * dim).transpose(0, 1).contiguous()
