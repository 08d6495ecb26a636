"""The documents of a micro-batch, computed once and handed to every layer.

A :class:`DocumentBatch` holds what a micro-batch's documents imply for the model: the router's
segments and, in training, every layer's pool for each of them (from the document ids of
:func:`megatron_emo.routing.documents.document_ids`), and attention's document boundaries
(``cu_seqlens`` for the variable-length flash kernel). It is megatron-core's
``PackedSeqParams``, extended: ``GPTModel.forward(..., packed_seq_params=)`` is megatron-core's
public path to every layer's core attention, forward and recomputed backward alike, and
:class:`megatron_emo.model.layer.EmoTransformerLayer` hands the same object to the MoE layer.

It is built from the token ids on the host, before they go to the GPU (the data loader's copy):
the number of documents decides the length of ``cu_seqlens`` and of the pool table, so building
it from GPU ids would make the host wait for the GPU once per micro-batch.

Rows are independent. Within a row an attention document ends at and includes its EOS: a new
document starts at position 0 of every row and right after every EOS, so a row that begins
with EOS makes that EOS a one-token document (it closes the previous row's document). Router
segments instead start at their EOS (the reference convention; see
:mod:`megatron_emo.routing.documents`).
"""

import functools
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_emo.routing.documents import TrainingPools, document_ids, segment_index


@dataclass
class DocumentBatch(PackedSeqParams):
    """megatron-core's packed-sequence parameters in ``sbhd`` layout (``max_seqlen_q/kv``: the
    row length, which megatron-core sizes the rotary table by), plus:"""

    segment_ids: Optional[torch.Tensor] = None
    """int64 ``[b*s]``, rows flattened in order: each token's router segment, 0 .. N - 1."""
    training_pools: Optional[torch.Tensor] = None
    """int64 ``[num_layers, >= N]``: layer ``l``'s training pool of each router segment in row
    ``l - 1`` (:meth:`TrainingPools.table`); None when the routing has no pools."""
    longest_document: Optional[int] = None
    """Tokens in the longest attention document: the flash kernel's ``max_seqlen``."""

    @classmethod
    def of(cls, tokens: torch.Tensor, eos_token_id: int, *, seed: int, step: int,
           sample_index: torch.Tensor, pools: Optional[TrainingPools]) -> "DocumentBatch":
        """The documents of ``tokens [b, s]``; ``seed``, ``step`` and ``sample_index`` (each row's
        index in the step's global batch) key the router's document ids, from which ``pools``
        (:meth:`TrainingPools.of` the model config) draws every layer's training pools."""
        cu_seqlens, longest = attention_boundaries(tokens, eos_token_id)
        ids = document_ids(tokens, eos_token_id, seed=seed, step=step, sample_index=sample_index)
        seq_len = tokens.shape[1]
        return cls(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                   max_seqlen_q=seq_len, max_seqlen_kv=seq_len, longest_document=longest,
                   segment_ids=segment_index(ids), training_pools=None if pools is None else pools.table(ids))

    def apply(self, move: Callable[[torch.Tensor], torch.Tensor]) -> "DocumentBatch":
        """The batch with ``move`` applied to its tensors (e.g. a copy to a device)."""
        cu_seqlens = move(self.cu_seqlens_q)
        pools = None if self.training_pools is None else move(self.training_pools)
        return replace(self, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                       segment_ids=move(self.segment_ids), training_pools=pools)


def document_batcher(config, eos_token_id: int) -> Callable[..., DocumentBatch]:
    """:meth:`DocumentBatch.of` with a model config's routing seed and training pools and the
    tokenizer's EOS id, called as ``(tokens, step=, sample_index=)``: how every trainer builds
    its micro-batches' documents (a model without the EMO router routes with seed 0, no pools)."""
    return functools.partial(DocumentBatch.of, eos_token_id=eos_token_id,
                             seed=getattr(config, "emo_routing_seed", 0), pools=TrainingPools.of(config))


def run_model(model, tokens: torch.Tensor, documents: DocumentBatch, labels: Optional[torch.Tensor] = None):
    """``model`` (a GPTModel or pipeline chunk) on ``tokens [b, s]`` with their documents: the
    per-token loss with ``labels``, else the logits."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None, labels=labels, packed_seq_params=documents)


def attention_boundaries(input_ids: torch.Tensor, eos_token_id: int, *, exact_max: bool = True):
    """Document boundaries of ``input_ids`` in the flattened ``[b*s]`` token order, the
    ``cu_seqlens`` and ``max_seqlen`` of :func:`megatron_emo.kernels.attention.document_attention`.

    Vectorised, no Python loop over documents. On CPU token ids (the data loader's, before they
    go to the GPU) it never synchronises with a device. On CUDA token ids it synchronises with
    the host once in either mode, because the number of documents, the length of
    ``cu_seqlens``, is data-dependent: ``exact_max`` reads the document count and the longest
    document in that one copy; without it the count comes from ``nonzero``.

    Args:
        input_ids: int ``[b, s]`` token ids.
        eos_token_id: the id that ends a document.
        exact_max: return the longest document as ``max_seqlen``; False returns the row length
            ``s``, an upper bound that needs no reduction (the flash kernel then launches
            blocks for ``s`` query positions per document, most of which exit at once).

    Returns:
        ``(cu_seqlens, max_seqlen)``: int32 ``[num_docs + 1]`` on ``input_ids``' device, the
        start of every document then ``b*s``; and a Python int.
    """
    batch, seq_len = input_ids.shape
    starts = torch.ones_like(input_ids, dtype=torch.bool)
    starts[:, 1:] = input_ids[:, :-1] == eos_token_id
    starts = starts.flatten()
    if exact_max:
        position = torch.arange(batch * seq_len, device=input_ids.device)
        # Each token's distance to its document's start: the start is the running max of the
        # start positions seen so far.
        offset = position - torch.where(starts, position, 0).cummax(0).values
        num_docs, max_seqlen = torch.stack([starts.sum(), offset.max() + 1]).tolist()
        doc_starts = torch.nonzero_static(starts, size=num_docs)[:, 0]
    else:
        doc_starts = starts.nonzero()[:, 0]
        max_seqlen = seq_len
    end = doc_starts.new_full((1,), batch * seq_len)
    return torch.cat([doc_starts, end]).to(torch.int32), max_seqlen
