"""DocumentBatch and attention_boundaries: documents end at and include their EOS for attention;
every row starts a document; the router's segments and pools come computed once."""

import pytest
import torch

from megatron_emo.model.document_batch import DocumentBatch, attention_boundaries
from megatron_emo.routing.documents import TrainingPools, document_ids, segment_index

EOS = 2

# name: (input_ids [b, s], expected cu_seqlens, expected longest document)
CASES = {
    "EOS inside a row": ([[5, 6, EOS, 7, 8]], [0, 3, 5], 3),
    "row begins with EOS": ([[EOS, 5, 6, EOS]], [0, 1, 4], 3),
    "no EOS": ([[5, 6, 7]], [0, 3], 3),
    "consecutive EOS": ([[5, EOS, EOS, EOS, 6]], [0, 2, 3, 4, 5], 2),
    "EOS at the last position": ([[5, 6, EOS]], [0, 3], 3),
    "two rows": ([[5, EOS, 6, 7], [EOS, 8, 9, EOS]], [0, 2, 4, 5, 8], 3),
    "one token per row": ([[EOS], [5]], [0, 1, 2], 1),
}


def test_a_document_batch_holds_the_router_segments_and_every_layers_pools():
    tokens = torch.tensor([[EOS, 5, 6, EOS, 7], [8, EOS, EOS, 9, 9]])
    keys = dict(seed=3, step=2, sample_index=torch.tensor([4, 5]))
    ids = document_ids(tokens, EOS, **keys)
    pools = TrainingPools(num_layers=3, pool_min=2, pool_max=9)
    batch = DocumentBatch.of(tokens, EOS, **keys, pools=pools)
    # Router segments start at an EOS (not at position 0's): 2 in row 0, 3 in row 1.
    assert batch.segment_ids.tolist() == [0, 0, 0, 1, 1, 2, 3, 4, 4, 4]
    assert torch.equal(batch.segment_ids, segment_index(ids))
    assert torch.equal(batch.training_pools, pools.table(ids))
    assert batch.cu_seqlens_q.tolist() == [0, 1, 4, 5, 7, 8, 10]
    assert DocumentBatch.of(tokens, EOS, **keys, pools=None).training_pools is None


@pytest.mark.parametrize("case", list(CASES))
def test_hand_written_boundaries(case):
    ids, expected, longest = CASES[case]
    ids = torch.tensor(ids)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == expected
    assert max_seqlen == longest and isinstance(max_seqlen, int)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS, exact_max=False)
    assert cu_seqlens.tolist() == expected and max_seqlen == ids.shape[1]


def boundaries_by_walking(ids):
    """The rule spelled out token by token: a document starts at every row start and after
    every EOS."""
    starts = []
    for r, row in enumerate(ids.tolist()):
        starts += [r * len(row) + p for p in range(len(row)) if p == 0 or row[p - 1] == EOS]
    return starts + [ids.numel()]


def test_random_rows_match_the_rule():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 9, (5, 64), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = EOS
    ids[1, 0] = ids[2, -1] = EOS
    expected = boundaries_by_walking(ids)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS)
    assert cu_seqlens.tolist() == expected
    assert max_seqlen == max(b - a for a, b in zip(expected, expected[1:]))


@pytest.mark.gpu
@pytest.mark.parametrize("exact_max", [True, False])
def test_cuda_matches_cpu_at_the_emo_shape(exact_max):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 1000, (2, 4096), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 30 / 4096] = EOS
    ids[0, 0] = EOS
    cu_cpu, max_cpu = attention_boundaries(ids, EOS, exact_max=exact_max)
    cu_gpu, max_gpu = attention_boundaries(ids.cuda(), EOS, exact_max=exact_max)
    assert cu_gpu.is_cuda and cu_gpu.dtype == torch.int32
    assert torch.equal(cu_gpu.cpu(), cu_cpu) and max_gpu == max_cpu
