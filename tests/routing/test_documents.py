"""Document segments, document ids and layout-invariant pool sizes (megatron_emo.routing.documents)."""

import random

import pytest
import torch

from megatron_emo.kernels.routing.segments import segment_ordinals
from megatron_emo.routing.documents import (
    ORDINAL_BITS,
    TrainingPools,
    document_ids,
    hash_combine,
    mix32,
    sample_pool_sizes,
    segment_index,
)
from tests.conftest import make_config

EOS = 2
SEED = 1234


# --- a pure-Python lowbias32 and hash_combine, written from the algorithm -------------------------

M32 = 0xFFFFFFFF


def py_mix32(x: int) -> int:
    """lowbias32 (Chris Wellons' 32-bit finaliser) on a Python int."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def py_hash_combine(*values: int) -> int:
    h = None
    for value in values:
        value = (value & M32) ^ py_mix32(value >> 32)
        h = py_mix32(value) if h is None else py_mix32(h * 31 + value)
    return h


# --- document ids and segment indices ----------------------------------------------------------------


def _random_batch(rows: int, seq: int, eos_rate: float = 0.2, generator=None) -> torch.Tensor:
    ids = torch.randint(3, 64, (rows, seq), generator=generator)
    eos = torch.rand(rows, seq, generator=generator) < eos_rate
    return ids.masked_fill(eos, EOS)


def test_document_ids_unique_per_row_and_segment_and_equal_within():
    ids = _random_batch(6, 40)
    ids[0, 1:4] = EOS  # consecutive EOS
    ids[1] = 7  # no EOS at all
    doc = document_ids(ids, EOS, seed=SEED, step=3, sample_index=torch.arange(6))
    assert doc.dtype == torch.int64 and doc.shape == ids.shape
    ordinals = segment_ordinals(ids == EOS)
    # The low bits hold the ordinal.
    assert torch.equal(doc & ((1 << ORDINAL_BITS) - 1), ordinals)
    keys = {}
    for row in range(ids.shape[0]):
        for pos in range(ids.shape[1]):
            key = (row, int(ordinals[row, pos]))
            keys.setdefault(key, set()).add(int(doc[row, pos]))
    # One id per (row, segment) ...
    assert all(len(v) == 1 for v in keys.values())
    # ... and different (row, segment) pairs get different ids.
    all_ids = [next(iter(v)) for v in keys.values()]
    assert len(set(all_ids)) == len(all_ids)


def test_document_ids_rejects_too_long_rows():
    too_long = torch.zeros(1, 1, dtype=torch.int64).expand(1, 2**ORDINAL_BITS)  # a view, no memory
    with pytest.raises(ValueError, match="exceeds"):
        document_ids(too_long, EOS, seed=SEED, step=0, sample_index=torch.zeros(1))


def test_segment_index_splits_rows_even_with_equal_ids():
    doc = torch.tensor([[5, 5, 7], [7, 7, 9], [9, 9, 9]])
    assert segment_index(doc).tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 4]


def test_segment_index_dense_and_consistent_with_document_ids():
    ids = _random_batch(5, 30)
    doc = document_ids(ids, EOS, seed=SEED, step=0, sample_index=torch.arange(5))
    seg = segment_index(doc)
    assert seg.shape == (5 * 30,)
    diffs = seg[1:] - seg[:-1]
    assert bool(((diffs == 0) | (diffs == 1)).all()) and int(seg[0]) == 0
    # Same dense segment <=> same document id.
    flat = doc.flatten()
    for i in range(0, flat.numel(), 7):
        for j in range(0, flat.numel(), 5):
            assert (seg[i] == seg[j]) == (flat[i] == flat[j])


# --- pool sizes ---------------------------------------------------------------------------------


def _many_documents(n: int, step: int = 0, seed: int = SEED) -> torch.Tensor:
    """n one-token documents, one per sample index."""
    ids = torch.full((n, 1), 7)
    return document_ids(ids, EOS, seed=seed, step=step, sample_index=torch.arange(n))


@pytest.mark.parametrize("pool_min,pool_max", [(3, 8), (8, 128), (5, 5)])
def test_sample_pool_sizes_in_range_and_equal_within_document(pool_min, pool_max):
    ids = _random_batch(8, 64)
    doc = document_ids(ids, EOS, seed=SEED, step=1, sample_index=torch.arange(8))
    pools = sample_pool_sizes(doc, 1, pool_min, pool_max)
    assert pools.shape == doc.shape and pools.dtype == torch.int64
    assert int(pools.min()) >= pool_min and int(pools.max()) <= pool_max
    for value in doc.unique():
        assert pools[doc == value].unique().numel() == 1


def test_sample_pool_sizes_roughly_uniform():
    pool_min, pool_max = 3, 10
    span = pool_max - pool_min + 1
    n = 16000
    pools = sample_pool_sizes(_many_documents(n), 2, pool_min, pool_max).flatten()
    counts = torch.bincount(pools - pool_min, minlength=span).double()
    assert counts.numel() == span and bool((counts > 0).all())  # every value hit
    expected = n / span
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 40) ~ 1e-6.
    assert chi2 < 40, counts.tolist()


def test_sample_pool_sizes_independent_across_layers():
    pool_min, pool_max = 3, 6
    span = pool_max - pool_min + 1
    n = 16000
    doc = _many_documents(n)
    a = sample_pool_sizes(doc, 1, pool_min, pool_max).flatten() - pool_min
    b = sample_pool_sizes(doc, 2, pool_min, pool_max).flatten() - pool_min
    joint = torch.bincount(a * span + b, minlength=span * span).double()
    expected = n / span**2
    chi2 = float(((joint - expected) ** 2 / expected).sum())
    # Independence would fail badly if layer 2 repeated (or shifted) layer 1's draws;
    # 15 degrees of freedom: P(chi2 > 60) ~ 1e-7.
    assert chi2 < 60, joint.view(span, span).tolist()


def test_pools_are_layout_invariant_split_batch():
    ids = _random_batch(4, 32)
    full_doc = document_ids(ids, EOS, seed=SEED, step=5, sample_index=torch.arange(4))
    part_doc = document_ids(ids[2:], EOS, seed=SEED, step=5, sample_index=torch.tensor([2, 3]))
    for layer in (1, 2, 3):
        full = sample_pool_sizes(full_doc, layer, 3, 128)
        part = sample_pool_sizes(part_doc, layer, 3, 128)
        assert torch.equal(full[2:], part)


def test_pools_are_layout_invariant_shifted_rows():
    ids = _random_batch(4, 32)
    doc = document_ids(ids, EOS, seed=SEED, step=5, sample_index=torch.arange(4))
    # Row 3 moved to the front, row 0 to the back, each keeping its global sample index.
    perm = torch.tensor([3, 1, 2, 0])
    shifted_doc = document_ids(ids[perm], EOS, seed=SEED, step=5, sample_index=perm)
    assert torch.equal(shifted_doc, doc[perm])
    assert torch.equal(sample_pool_sizes(shifted_doc, 1, 3, 128), sample_pool_sizes(doc, 1, 3, 128)[perm])


def test_pools_depend_on_step_seed_and_layer():
    n = 2000
    base = sample_pool_sizes(_many_documents(n, step=0), 1, 8, 128)
    other_step = sample_pool_sizes(_many_documents(n, step=1), 1, 8, 128)
    other_seed = sample_pool_sizes(_many_documents(n, seed=SEED + 1), 1, 8, 128)
    other_layer = sample_pool_sizes(_many_documents(n, step=0), 2, 8, 128)
    for other in (other_step, other_seed, other_layer):
        # With 121 values, equal by chance ~1% of the time.
        assert float((base == other).double().mean()) < 0.05


def test_same_sample_index_different_rows_same_ids():
    """Document ids depend on the data and the sample index, not on the position in the batch."""
    ids = _random_batch(1, 16)
    batch = torch.cat([torch.randint(3, 64, (1, 16)), ids])
    alone = document_ids(ids, EOS, seed=SEED, step=2, sample_index=torch.tensor([9]))
    in_batch = document_ids(batch, EOS, seed=SEED, step=2, sample_index=torch.tensor([4, 9]))
    assert torch.equal(alone[0], in_batch[1])


# --- the hash ---------------------------------------------------------------------------------


def test_mix32_matches_python_lowbias32():
    values = torch.randint(0, 2**32, (2000,), dtype=torch.int64)
    values[:4] = torch.tensor([0, 1, 2**32 - 1, 2**31])
    got = mix32(values)
    assert got.dtype == torch.int64
    assert got.tolist() == [py_mix32(v) for v in values.tolist()]


def test_mix32_masks_to_32_bits():
    values = torch.randint(0, 2**32, (100,), dtype=torch.int64)
    high = values + (torch.randint(1, 2**20, (100,), dtype=torch.int64) << 32)
    assert torch.equal(mix32(high), mix32(values))


def test_hash_combine_matches_python_on_32_bit_inputs():
    rng = random.Random(0)
    for _ in range(200):
        values = [rng.randrange(2**32) for _ in range(rng.randint(1, 4))]
        assert int(hash_combine(*values)) == py_hash_combine(*values), values


def test_hash_combine_matches_python_on_tensors_and_64_bit_document_ids():
    a = torch.randint(0, 2**32, (500,), dtype=torch.int64)
    doc = (torch.randint(0, 2**32, (500,), dtype=torch.int64) << ORDINAL_BITS) | torch.randint(
        0, 1000, (500,), dtype=torch.int64
    )
    got = hash_combine(a, doc, 7)
    assert got.shape == (500,)
    want = [py_hash_combine(x, y, 7) for x, y in zip(a.tolist(), doc.tolist())]
    assert got.tolist() == want
    assert int(got.min()) >= 0 and int(got.max()) < 2**32


def test_hash_combine_is_order_sensitive():
    assert int(hash_combine(1, 2)) != int(hash_combine(2, 1))


def test_document_ids_row_key_is_the_hash_of_seed_step_index():
    ids = torch.tensor([[5, EOS, 6]])
    doc = document_ids(ids, EOS, seed=11, step=22, sample_index=torch.tensor([33]))
    key = py_hash_combine(11, 22, 33)
    assert doc.tolist() == [[key << ORDINAL_BITS, (key << ORDINAL_BITS) | 1, (key << ORDINAL_BITS) | 1]]


def test_sample_pool_sizes_formula():
    doc = _many_documents(50).flatten()
    pools = sample_pool_sizes(doc, 3, 8, 128)
    assert pools.tolist() == [8 + py_hash_combine(d, 3) % 121 for d in doc.tolist()]


# --- the pool table: every layer's pool of every segment ----------------------------------------


def test_pool_table_holds_each_layers_pool_of_each_segment():
    ids = _random_batch(3, 20, generator=torch.Generator().manual_seed(0))
    doc = document_ids(ids, EOS, seed=SEED, step=0, sample_index=torch.arange(3))
    seg = segment_index(doc)
    table = TrainingPools(num_layers=4, pool_min=3, pool_max=8).table(doc)
    num_segments = int(seg.max()) + 1
    # Columns rounded up to even, so that every row starts 16-byte aligned.
    assert table.shape == (4, num_segments + num_segments % 2) and table.dtype == torch.int64
    assert table.stride(0) * table.element_size() % 16 == 0
    for layer in range(1, 5):
        # Row layer - 1, indexed by segment, gives every token its document's pool in that layer.
        assert torch.equal(table[layer - 1][seg], sample_pool_sizes(doc, layer, 3, 8).flatten())
    assert len({tuple(row.tolist()) for row in table}) == 4  # layers draw independently


def test_pools_of_a_config():
    config = make_config(emo_pool_min=3, emo_pool_max=8)
    assert TrainingPools.of(config) == TrainingPools(config.num_layers, 3, 8)
    assert TrainingPools.of(make_config(emo_router_mode="topk")) is None
