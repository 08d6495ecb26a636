"""Vocabulary-parallel cross-entropy (megatron_emo.kernels.cross_entropy): the reference against
PyTorch's own loss, the Triton kernels against the reference (``triton_interpret``: the
interpreter at small shapes, natively on a GPU), a vocabulary split over two gloo ranks against
the whole, and on a GPU the full shape against megatron-core's fused loss."""

import pytest
import torch
import torch.nn.functional as F

from megatron_emo.kernels.cross_entropy import cross_entropy, reference
from megatron_emo.testing.distributed import run_distributed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loss_and_grad(logits: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor, loss_fn):
    """``loss_fn``'s losses and the gradient of ``sum(losses * grad_loss)`` in the logits."""
    leaf = logits.detach().clone().requires_grad_()
    losses = loss_fn(leaf * 1, target)  # through an op: cross_entropy writes its gradient over its input
    (losses * grad_loss).sum().backward()
    return losses.detach(), leaf.grad


def torch_loss(logits, target):
    return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)


@pytest.mark.parametrize("shape", [(1, 1, 5), (4, 3, 37), (2, 2, 300)], ids=["one token", "small", "wide"])
def test_the_loss_and_its_gradient_equal_pytorchs(shape):
    logits = torch.randn(shape) * 4
    target = torch.randint(0, shape[-1], shape[:-1])
    grad_loss = torch.rand(shape[:-1])
    ours = loss_and_grad(logits, target, grad_loss, cross_entropy)
    theirs = loss_and_grad(logits, target, grad_loss, torch_loss)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_bf16_logits_get_fp32_losses_and_bf16_gradients():
    logits = (torch.randn(6, 50) * 4).bfloat16()
    target = torch.randint(0, 50, (6,))
    losses, grad = loss_and_grad(logits, target, torch.ones(6), cross_entropy)
    assert losses.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(losses, torch_loss(logits, target), rtol=1e-5, atol=1e-5)
    expected = torch.softmax(logits.float(), -1) - F.one_hot(target, 50)
    torch.testing.assert_close(grad.float(), expected, rtol=1e-2, atol=1e-2)


def test_a_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="leading dims"):
        cross_entropy(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))


def _split_vocabulary(rank, world_size, logits, target, grad_loss):
    group = torch.distributed.new_group(list(range(world_size)))
    vocab = logits.shape[-1] // world_size
    mine = logits[..., rank * vocab:(rank + 1) * vocab]
    return loss_and_grad(mine, target, grad_loss, lambda x, t: cross_entropy(x, t, group))


def test_a_vocabulary_split_over_two_ranks_gives_the_whole_loss_and_each_ranks_gradient_slice():
    logits, target, grad_loss = torch.randn(3, 4, 40) * 4, torch.randint(0, 40, (3, 4)), torch.rand(3, 4)
    whole_loss, whole_grad = loss_and_grad(logits, target, grad_loss, torch_loss)
    for rank, (losses, grad) in enumerate(run_distributed(_split_vocabulary, 2, logits, target, grad_loss)):
        torch.testing.assert_close(losses, whole_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, whole_grad[..., rank * 20:(rank + 1) * 20], rtol=1e-5, atol=1e-6)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (5, 64), (9, 200)], ids=["under a block", "a block", "off the blocks"])
def test_the_triton_kernels_equal_the_reference(rows, vocab, dtype):
    from megatron_emo.kernels.cross_entropy import triton_impl

    logits = (torch.randn(rows, vocab, device=DEVICE) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=DEVICE)
    target[::3] = -1  # labels that another rank holds
    stats = triton_impl.row_stats(logits, target)
    expected = reference.row_stats(logits, target)
    for mine, theirs in zip(stats, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    logsumexp = expected[0] + torch.log(expected[1])
    grad_loss = torch.rand(rows, device=DEVICE)
    mine = triton_impl.logits_grad_(logits.clone(), logsumexp, target, grad_loss)
    theirs = reference.logits_grad_(logits.clone(), logsumexp, target, grad_loss)
    torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.gpu
def test_at_full_shape_on_gpu_it_equals_megatron_cores_losses(tmp_path):
    """8192 tokens (a proxy micro-batch) over a 100k vocabulary, bf16 logits, against
    megatron-core's plain and fused vocabulary-parallel losses."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        group = parallel_state.get_tensor_model_parallel_group()
        logits = (torch.randn(4096, 2, 100_352, device="cuda") * 4).bfloat16()
        target = torch.randint(0, 100_352, (4096, 2), device="cuda")
        grad_loss = torch.rand(4096, 2, device="cuda")
        ours = loss_and_grad(logits, target, grad_loss, lambda x, t: cross_entropy(x, t, group))
        for theirs in (vocab_parallel_cross_entropy, lambda x, t: fused_vocab_parallel_cross_entropy(x, t, group)):
            losses, grad = loss_and_grad(logits, target, grad_loss, theirs)
            torch.testing.assert_close(ours[0], losses.float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours[1].float(), grad.float(), rtol=2e-2, atol=1e-6)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
