"""Pure-PyTorch reference of ``megatron_emo.kernels.attention.document_attention``: SDPA with a
dense document-causal mask built from ``cu_seqlens``.

Legend: s positions per row, b rows, n query heads, g key/value heads (g divides n), d head
width, T = b*s tokens, D documents.

    cu_seqlens [D + 1] --document of every token--> ids [b, s]
    --same document and key <= query--> bool mask [b, 1, s, s]
    query [s, b, n, d], key/value [s, b, g, d] --SDPA--> [s, b, n*d]

It is the CPU path of the model and the oracle of the flash path's tests. The mask costs
O(s²) memory per row. Unlike the flash kernel it reads ``cu_seqlens`` on the host to reject
boundaries the kernel would silently mis-handle.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def document_index(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """int64 ``[b, s]``: the document of every token, numbered in ``[b*s]`` token order."""
    tokens = torch.arange(batch * seq_len, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1).view(batch, seq_len)


def check_boundaries(cu_seqlens: torch.Tensor, max_seqlen: int, batch: int, seq_len: int) -> None:
    """Raise ValueError unless ``cu_seqlens`` splits the ``b*s`` tokens into documents within
    rows, each at most ``max_seqlen`` long (the flash kernel would attend across rows, or skip
    the positions past ``max_seqlen``)."""
    row_starts = torch.arange(0, batch * seq_len, seq_len, device=cu_seqlens.device)
    if (cu_seqlens[0] != 0 or cu_seqlens[-1] != batch * seq_len
            or not torch.isin(row_starts, cu_seqlens).all()):
        raise ValueError(f"cu_seqlens must run from 0 to b*s = {batch * seq_len} and include every row start")
    longest = int(cu_seqlens.diff().max())
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest document, {longest}")


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """:func:`megatron_emo.kernels.attention.document_attention`: SDPA with a dense mask."""
    seq_len, batch, heads, dim = query.shape
    check_boundaries(cu_seqlens, max_seqlen, batch, seq_len)
    ids = document_index(cu_seqlens, batch, seq_len)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).tril()
    mask = (ids[:, :, None] == ids[:, None, :]) & causal
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    # Every query sees itself, so no row of the mask is empty and no softmax is NaN.
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=k.shape[1] != heads
    )
    return out.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * dim)
