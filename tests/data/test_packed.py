import itertools

import pytest
import torch

from megatron_emo.data.packed import PackedSamples

EOS = 3


def test_documents_are_joined_by_eos_and_cut_into_rows():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    samples = PackedSamples(docs, EOS, seq_length=4, seed=0)
    stream = samples.tokens.tolist()
    assert stream.count(EOS) >= 2 and len(samples) == (3 + 2 + 4 + 3 - 1) // 4
    tokens, labels = samples.batch(torch.tensor([0, 1]))
    assert tokens.shape == labels.shape == (2, 4)
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    assert torch.equal(tokens[1, 0:1], labels[0, -1:])  # rows continue the stream
    # The stream is the documents in some order, each followed by EOS, cut after the last row.
    orders = itertools.permutations(docs)
    joined = [[t for doc in order for t in doc + [EOS]] for order in orders]
    assert any(stream == full[: len(stream)] for full in joined)


def test_indices_wrap_around_epochs():
    samples = PackedSamples([list(range(10, 40))], EOS, seq_length=5, seed=0)
    n = len(samples)
    a, _ = samples.batch(torch.tensor([1]))
    b, _ = samples.batch(torch.tensor([1 + 3 * n]))
    assert torch.equal(a, b)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_length"):
        PackedSamples([[10, 11]], EOS, seq_length=64, seed=0)
