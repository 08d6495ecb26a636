"""Training samples through megatron-core's GPTDataset/BlendedDataset (megatron_emo.data.gpt_data):
packed whole documents, segment ids at EOS, mixture weights, seeds, resume from the cache."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset

from megatron_emo.data.gpt_data import build_train_dataset, collate
from megatron_emo.data.indexed import AtomicDatasetWriter
from megatron_emo.kernels.routing.segments import segment_ordinals
from megatron_emo.routing.documents import document_ids

SEQ = 32
NUM_DOCS = 200
FIRST_ID = {"a": 10, "b": 1000}
"""Document ``k`` of dataset ``name`` is ``length(k)`` copies of the token ``FIRST_ID[name] + k``."""


def length(k: int) -> int:
    return 1 + (k * 7) % 23  # 1..23 tokens, EOS not counted


def owner(token: int) -> tuple[str, int]:
    """(dataset, document number) of a content token."""
    name = "b" if token >= FIRST_ID["b"] else "a"
    return name, token - FIRST_ID[name]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_tokenizer):
    """Two synthetic datasets whose tokens name their document; returns their prefixes."""
    root = tmp_path_factory.mktemp("synthetic")
    prefixes = {}
    for name, first in FIRST_ID.items():
        prefixes[name] = str(root / name)
        with AtomicDatasetWriter(prefixes[name], tokenizer=str(demo_tokenizer.model_file),
                                 vocab_size=demo_tokenizer.vocab_size, eos_id=demo_tokenizer.eos_id) as writer:
            for k in range(NUM_DOCS):
                writer.add_document([first + k] * length(k))
    return prefixes


def build(corpus, tokenizer, cache_dir, *, weights=(0.5, 0.5), num_samples=200, seed=0, split="98,2,0"):
    blend = [(weight, corpus[name]) for weight, name in zip(weights, ("a", "b"))]
    return build_train_dataset(blend, tokenizer, seq_length=SEQ, num_samples=num_samples, seed=seed,
                               split=split, cache_dir=cache_dir)


def check_packed(text: list[int], eos: int) -> int:
    """Assert ``text`` (a sample's seq_length + 1 tokens) is documents cut only at its edges: the
    tokens between two EOS are one whole document, before the first EOS the end of one, after
    the last EOS the start of one. Returns the number of EOS."""
    positions = [i for i, token in enumerate(text) if token == eos]
    bounds = [-1, *positions, len(text)]
    for j, (start, end) in enumerate(zip(bounds, bounds[1:])):
        chunk = text[start + 1 : end]
        is_first, is_last = j == 0, j == len(bounds) - 2
        if not chunk:
            assert is_first or is_last, (text, j)  # two EOS in a row: an empty document
            continue
        assert len(set(chunk)) == 1, (text, j)  # one document, no EOS missing in between
        _, k = owner(chunk[0])
        if is_first or is_last:
            assert len(chunk) <= length(k), (text, j)  # a suffix / a prefix of document k
        else:
            assert len(chunk) == length(k), (text, j)  # the whole document k
    return len(positions)


def test_samples_are_packed_whole_documents(megatron_cpu, corpus, demo_tokenizer, tmp_path):
    eos = demo_tokenizer.eos_id
    dataset = build(corpus, demo_tokenizer, tmp_path / "cache")
    assert isinstance(dataset, BlendedDataset) and len(dataset) >= 200
    total_eos = 0
    for i in range(200):
        sample = dataset[i]
        tokens, labels = sample["tokens"], sample["labels"]
        assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == labels.shape == (SEQ,)
        assert torch.equal(labels[:-1], tokens[1:])  # labels are the tokens shifted by one
        assert torch.equal(sample["loss_mask"], torch.ones(SEQ))  # packed: no padding
        total_eos += check_packed(tokens.tolist() + [int(labels[-1])], eos)
    assert total_eos > 200  # documents of ~13 tokens in 33-token windows: several per sample


def test_collate_and_segment_ordinals_follow_document_boundaries(megatron_cpu, corpus, demo_tokenizer, tmp_path):
    eos = demo_tokenizer.eos_id
    dataset = build(corpus, demo_tokenizer, tmp_path / "cache")
    indices = torch.arange(40, 56)
    batch = collate(dataset, indices)
    assert set(batch) == {"tokens", "labels", "loss_mask"}
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (16, SEQ)
    for row, index in enumerate(indices.tolist()):
        assert torch.equal(batch["tokens"][row], dataset[index]["tokens"])
        assert torch.equal(batch["labels"][row], dataset[index]["labels"])
    tokens = batch["tokens"]
    assert torch.equal(batch["labels"][:, :-1], tokens[:, 1:])

    ordinals = segment_ordinals(tokens == eos)
    assert (ordinals[:, 0] == 0).all()
    steps = ordinals[:, 1:] - ordinals[:, :-1]
    assert torch.equal(steps, (tokens[:, 1:] == eos).long())  # +1 exactly at each EOS (after the first token)
    for row in range(tokens.shape[0]):
        for segment in ordinals[row].unique().tolist():
            content = tokens[row][(ordinals[row] == segment) & (tokens[row] != eos)]
            assert len(content.unique()) <= 1  # one segment = (the EOS before it and) one document
    # the router's document ids: equal exactly within a segment
    docs = document_ids(tokens, eos, seed=7, step=3, sample_index=indices)
    same_id = docs[:, :, None] == docs[:, None, :]
    same_segment = (ordinals[:, :, None] == ordinals[:, None, :])
    assert torch.equal(same_id, same_segment)
    assert len(docs[:, 0].unique()) == 16  # and rows never share one


def test_mixture_weights_are_respected(megatron_cpu, corpus, demo_tokenizer, tmp_path):
    dataset = build(corpus, demo_tokenizer, tmp_path / "cache", weights=(0.2, 0.8), num_samples=4000)
    assert len(dataset) >= 4000
    source = np.asarray(dataset.dataset_index[:4000])
    share_a = float((source == 0).mean())
    assert abs(share_a - 0.2) <= 0.03, share_a
    assert abs(float((source == 1).mean()) - 0.8) <= 0.03
    # dataset_index says where a sample comes from; the tokens agree
    for i in range(0, 4000, 37):
        sample = dataset[i]
        names = {owner(t)[0] for t in sample["tokens"].tolist() if t != demo_tokenizer.eos_id}
        assert names == {"ab"[int(sample["dataset_id"])]}, i
    # and the blend's order: every window of 100 samples is mixed near 20/80
    windows = source.reshape(40, 100).mean(axis=1)
    assert ((windows > 0.6) & (windows < 0.95)).all()


def _samples(dataset, indices):
    return [dataset[i]["tokens"] for i in indices]


def test_same_seed_same_samples_other_seed_other_order(megatron_cpu, corpus, demo_tokenizer, tmp_path):
    indices = range(100)
    first = _samples(build(corpus, demo_tokenizer, tmp_path / "one", seed=5), indices)
    again = _samples(build(corpus, demo_tokenizer, tmp_path / "two", seed=5), indices)  # built anew
    other = _samples(build(corpus, demo_tokenizer, tmp_path / "three", seed=6), indices)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    differing = sum(not torch.equal(x, y) for x, y in zip(first, other))
    assert differing > 90, differing
    # another order of the same documents: both runs start on their own shuffle of dataset a and b
    for samples in (first, other):
        owners = {owner(t) for s in samples for t in s.tolist() if t != demo_tokenizer.eos_id}
        assert len(owners) > 100


def test_rebuild_from_the_cache_gives_the_same_sample(megatron_cpu, corpus, demo_tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    indices = [0, 1, 17, 123, 199]
    dataset = build(corpus, demo_tokenizer, cache, seed=3)
    before = _samples(dataset, indices)
    cached = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    assert any(p.suffix == ".npy" for p in cached)

    def no_write(*args, **kwargs):
        raise AssertionError("the rebuild wrote an index: no cache hit")

    monkeypatch.setattr(np, "save", no_write)  # a resumed run reads megatron-core's cached indices
    rebuilt = build(corpus, demo_tokenizer, cache, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(before, _samples(rebuilt, indices)))
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == cached
    batch, again = collate(dataset, torch.tensor(indices)), collate(rebuilt, torch.tensor(indices))
    assert all(torch.equal(batch[key], again[key]) for key in batch)
