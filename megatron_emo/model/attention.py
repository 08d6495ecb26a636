"""Core attention on ``scaled_dot_product_attention``, causal within each document.

megatron-core's local ``DotProductAttention`` materialises the scores itself and builds its mask
on ``"cuda"``; this one takes the layer's document ids (passed as the attention mask, see
:mod:`megatron_emo.model.layer`) and lets SDPA pick its kernel.

Attention documents end *at and including* their EOS, while router segments start at it (the
reference convention), so the attention ids are the router ids shifted one position right.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def attention_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Attention document of every position: the router ids ``[b, s]`` shifted one right, so an
    EOS closes its document."""
    return torch.cat([document_ids[:, :1], document_ids[:, :-1]], dim=1)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[b, 1, s, s]``: query i sees key j iff j <= i and both are in one document.

    Args:
        document_ids: int ``[b, s]`` router segment ids (a segment starts at its EOS).
    """
    ids = attention_ids(document_ids)
    same_document = ids[:, :, None] == ids[:, None, :]
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    return (same_document & causal)[:, None]


class DocumentCausalAttention(MegatronModule):
    """Drop-in core attention (megatron-core's ``CoreAttention`` interface)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("DocumentCausalAttention does not split sequences (CP=1)")
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """``query [s, b, n, d]``, ``key``/``value [s, b, g, d]``, ``attention_mask`` the document
        ids ``[b, s]`` (None: plain causal) → ``[s, b, n*d]``."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention bias and packed sequences are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None if attention_mask is None else document_causal_mask(attention_mask)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        seq_len, batch = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)
