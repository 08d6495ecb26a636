"""Core attention, causal within each document of the micro-batch.

megatron-core's local ``DotProductAttention`` materialises the scores itself and builds its mask
on ``"cuda"``; this one takes the micro-batch's :class:`~megatron_emo.model.document_batch.
DocumentBatch` (megatron-core's ``packed_seq_params``, built once per micro-batch) and runs
:func:`megatron_emo.kernels.attention.document_attention`: the variable-length flash kernel on
GPU, its PyTorch reference on CPU. Without documents (``packed_seq_params=None``) attention is
causal over the whole row.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_emo.kernels.attention import document_attention


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
        """``query [s, b, n, d]``, ``key``/``value [s, b, g, d]``, ``packed_seq_params`` the
        micro-batch's DocumentBatch (None: causal over whole rows) → ``[s, b, n*d]``."""
        if attention_mask is not None or attention_bias is not None:
            raise NotImplementedError("attention masks and biases are not supported: documents come as a DocumentBatch")
        if self.training and self.dropout:
            raise NotImplementedError("attention dropout is not supported (the flash kernel has none)")
        if packed_seq_params is not None:
            return document_attention(query, key, value, packed_seq_params.cu_seqlens_q,
                                      packed_seq_params.longest_document, scale=self.softmax_scale)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        seq_len, batch = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)
