import math

import pytest
import torch

from megatron_emo.model.attention import DocumentCausalAttention
from megatron_emo.model.document_batch import DocumentBatch
from tests.conftest import make_config as model_config

EOS = 2


def _explicit_attention(q, k, v, mask):
    """softmax(q kᵀ / √d + mask) v per batch and head, [s, b, n, d] layout; ``mask [b, s, s]``."""
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("bnst,tbnd->sbnd", scores.softmax(dim=-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def test_core_attention_is_causal_within_documents_and_an_eos_closes_its_document():
    attention = DocumentCausalAttention(model_config(), 1, None, "self")
    s, b, n, d = 6, 2, 2, 8
    q, k, v = (torch.randn(s, b, n, d) for _ in range(3))
    # Row 0: the EOS at 2 ends the first document. Row 1 begins with EOS (it closes the previous
    # row's document), so that EOS is a document of its own.
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9], [EOS, 5, 6, 7, 8, 9]])
    documents = DocumentBatch.of(ids, EOS, seed=0, step=0, sample_index=torch.arange(b), pools=None)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    document = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])  # written out by hand
    mask = (document[:, :, None] == document[:, None, :]) & causal
    assert mask[1, 1, 0].item() is False and mask[0, 3, 2].item() is False
    torch.testing.assert_close(attention(q, k, v, None, packed_seq_params=documents),
                               _explicit_attention(q, k, v, mask))
    # Without documents: causal over the whole row.
    torch.testing.assert_close(attention(q, k, v, None), _explicit_attention(q, k, v, causal.expand(b, s, s)))


def test_core_attention_refuses_masks():
    attention = DocumentCausalAttention(model_config(), 1, None, "self")
    q = torch.randn(4, 1, 2, 8)
    with pytest.raises(NotImplementedError, match="DocumentBatch"):
        attention(q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
