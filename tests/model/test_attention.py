import math

import torch

from megatron_emo.model.attention import DocumentCausalAttention, document_causal_mask
from megatron_emo.routing.documents import segment_ordinals
from tests.conftest import make_config as model_config

EOS = 2


def test_mask_is_causal_within_documents_and_eos_closes_its_document():
    # Router segments start at the EOS (position 3); attention keeps the EOS in the document it ends.
    ids = torch.tensor([[5, 6, 7, EOS, 8, 9]])
    mask = document_causal_mask(segment_ordinals(ids, EOS))[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # the EOS sees its own document
            [0, 0, 0, 0, 1, 0],  # the next document starts fresh
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_row_without_eos_is_plain_causal():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = document_causal_mask(segment_ordinals(ids, EOS))[0, 0]
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).tril())


def _explicit_attention(q, k, v, mask):
    """softmax(q kᵀ / √d + mask) v per batch and head, [s, b, n, d] layout."""
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bnst,tbnd->sbnd", scores.softmax(dim=-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def test_core_attention_matches_explicit_softmax():
    config = model_config()
    attention = DocumentCausalAttention(config, 1, None, "self")
    s, b, n, d = 7, 2, 2, 8
    q, k, v = (torch.randn(s, b, n, d) for _ in range(3))
    ids = torch.tensor([[5, 6, EOS, 7, 8, EOS, EOS], [EOS, 5, 6, 7, EOS, 8, 9]])
    docs = segment_ordinals(ids, EOS)
    out = attention(q, k, v, docs)
    expected = _explicit_attention(q, k, v, document_causal_mask(docs))
    torch.testing.assert_close(out, expected)
    # Without document ids: plain causal attention.
    causal = _explicit_attention(q, k, v, torch.ones(s, s, dtype=torch.bool).tril())
    torch.testing.assert_close(attention(q, k, v, None), causal)
