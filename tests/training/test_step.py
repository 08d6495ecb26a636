"""to_device: a micro-batch reaches the device whole; to a GPU without waiting for it."""

import pytest
import torch

from megatron_emo.model.document_batch import DocumentBatch
from megatron_emo.routing.documents import TrainingPools
from megatron_emo.training.step import to_device

EOS = 2


def _microbatch():
    tokens = torch.tensor([[5, EOS, 6, 7], [EOS, 8, 9, EOS]])
    batch = {"tokens": tokens, "labels": tokens.roll(-1, dims=1), "loss_mask": torch.ones(2, 4)}
    documents = DocumentBatch.of(tokens, EOS, seed=0, step=3, sample_index=torch.arange(2),
                                 pools=TrainingPools(num_layers=2, pool_min=3, pool_max=8))
    return batch, documents


def _check_same(moved, batch, documents, device_type):
    tokens, labels, loss_mask, moved_documents = moved
    for got, want in ((tokens, batch["tokens"]), (labels, batch["labels"]), (loss_mask, batch["loss_mask"]),
                      (moved_documents.cu_seqlens_q, documents.cu_seqlens_q),
                      (moved_documents.segment_ids, documents.segment_ids),
                      (moved_documents.training_pools, documents.training_pools)):
        assert got.device.type == device_type and torch.equal(got.cpu(), want)
    assert moved_documents.cu_seqlens_kv is moved_documents.cu_seqlens_q
    assert moved_documents.longest_document == documents.longest_document == 3


def test_to_device_on_the_cpu_keeps_the_batch():
    batch, documents = _microbatch()
    _check_same(to_device(batch, documents, "cpu"), batch, documents, "cpu")


@pytest.mark.gpu
def test_to_device_queues_the_copies_behind_the_gpu_work():
    batch, documents = _microbatch()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work ahead of the copies
    moved = to_device(batch, documents, torch.device("cuda"))
    # A copy from pageable memory would have returned only once the GPU reached it.
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    _check_same(moved, batch, documents, "cuda")
