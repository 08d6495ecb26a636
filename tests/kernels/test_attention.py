"""Document-causal attention (megatron_emo.kernels.attention): the reference against a loop over
documents on the CPU; on a GPU, PyTorch's varlen flash kernel against the fp32 reference.

The loop finds the documents itself, token by token, so these tests check the boundaries of
megatron_emo.model.document_batch.attention_boundaries along with the attention.
"""

import logging

import pytest
import torch

from megatron_emo.kernels import attention
from megatron_emo.kernels.attention import reference
from megatron_emo.model.document_batch import attention_boundaries

EOS = 2

# name: input_ids [b, s]
CASES = {
    "row begins with EOS": [[EOS, 5, 6, 7, EOS, 8, 9]],
    "no EOS": [[5, 6, 7, 8, 9, 3, 4]],
    "consecutive EOS": [[5, EOS, EOS, EOS, 6, 7, 8]],
    "EOS at the last position": [[5, 6, 7, EOS, 8, 9, EOS]],
    "three rows": [[EOS, 5, EOS, 6, 7, 8, EOS], [5, 6, 7, 8, 9, 3, 4], [5, EOS, EOS, 6, 7, EOS, 8]],
}
HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (6, 1)}
DIM = 8


def make_inputs(ids, heads, kv_heads, dim, dtype=torch.float64, device="cpu", seed=0):
    """query ``[s, b, n, d]``, key and value ``[s, b, g, d]``, leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq_len = ids.shape
    shapes = [(seq_len, batch, heads, dim)] + 2 * [(seq_len, batch, kv_heads, dim)]
    return [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for shape in shapes]


def loop_over_documents(query, key, value, ids, scale=None):
    """softmax(q kᵀ · scale) v for every token over the earlier tokens of its document, one
    token and head at a time; a document starts at every row start and after every EOS."""
    seq_len, batch, heads, dim = query.shape
    group = heads // key.shape[2]
    scale = dim**-0.5 if scale is None else scale
    rows = []
    for r in range(batch):
        positions = []
        for p in range(seq_len):
            if p == 0 or ids[r, p - 1] == EOS:
                start = p
            k, v = key[start : p + 1, r], value[start : p + 1, r]
            positions.append(
                torch.stack(
                    [(k[:, h // group] @ query[p, r, h] * scale).softmax(0) @ v[:, h // group] for h in range(heads)]
                )
            )
        rows.append(torch.stack(positions))
    return torch.stack(rows, dim=1).reshape(seq_len, batch, heads * dim)


def outputs_and_grads(fn, inputs, grad_out):
    """``fn(*inputs)`` detached, and the gradients of ``sum(fn(*inputs) * grad_out)``."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in inputs]


# ---------------------------------------------------------------- reference (CPU)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_a_loop_over_documents(case, heads):
    ids = torch.tensor(CASES[case])
    inputs = make_inputs(ids, *HEADS[heads], DIM)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS)
    grad_out = torch.randn(ids.shape[1], ids.shape[0], HEADS[heads][0] * DIM, dtype=torch.float64)
    ours = outputs_and_grads(
        lambda q, k, v: reference.document_attention(q, k, v, cu_seqlens, max_seqlen), inputs, grad_out
    )
    loop = outputs_and_grads(lambda q, k, v: loop_over_documents(q, k, v, ids), inputs, grad_out)
    for what, a, b in zip(["out", "grad query", "grad key", "grad value"], ours, loop):
        torch.testing.assert_close(a, b, msg=what)


def test_reference_applies_the_scale():
    ids = torch.tensor(CASES["three rows"])
    q, k, v = make_inputs(ids, *HEADS["GQA"], DIM)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS)
    out = reference.document_attention(q, k, v, cu_seqlens, max_seqlen, scale=0.3)
    torch.testing.assert_close(out, loop_over_documents(q, k, v, ids, scale=0.3))


def test_reference_rejects_boundaries_the_kernel_would_mishandle():
    ids = torch.tensor(CASES["three rows"])
    q, k, v = make_inputs(ids, *HEADS["MHA"], DIM)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS)
    row_start = cu_seqlens == ids.shape[1]
    with pytest.raises(ValueError, match="row start"):
        reference.document_attention(q, k, v, cu_seqlens[~row_start], max_seqlen)
    with pytest.raises(ValueError, match="row start"):
        reference.document_attention(q, k, v, cu_seqlens[:-1], max_seqlen)
    with pytest.raises(ValueError, match="max_seqlen"):
        reference.document_attention(q, k, v, cu_seqlens, max_seqlen - 1)


# ---------------------------------------------------------------- dispatch


def test_select_path():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention.select_path(cuda, torch.bfloat16) == "varlen"
    assert attention.select_path(cuda, torch.float16) == "varlen"
    assert attention.select_path(cuda, torch.float32) == "reference"
    assert attention.select_path(cpu, torch.bfloat16) == "reference"


def test_cpu_runs_the_reference_and_logs_it_once(monkeypatch, caplog):
    from megatron_emo import logs

    monkeypatch.setattr(logs, "_logged_once", set())
    ids = torch.tensor(CASES["three rows"])
    q, k, v = make_inputs(ids, *HEADS["GQA"], DIM, dtype=torch.float32)
    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS)
    with caplog.at_level(logging.INFO, logger="megatron_emo.kernels.attention"):
        outs = [attention.document_attention(q, k, v, cu_seqlens, max_seqlen) for _ in range(2)]
    assert torch.equal(outs[0], reference.document_attention(q, k, v, cu_seqlens, max_seqlen))
    assert [r.getMessage() for r in caplog.records] == ["document_attention: path = reference"]


def test_the_varlen_module_imports_without_touching_cuda():
    pytest.importorskip("torch.nn.attention.varlen")
    from megatron_emo.kernels.attention import varlen_impl

    assert varlen_impl.CAUSAL == (-1, 0)
    assert not torch.cuda.is_initialized()


# ---------------------------------------------------------------- varlen flash kernel (GPU)


def emo_batch(batch=2, seq_len=4096, docs_per_row=30, seed=0):
    """int64 ``[b, s]`` token ids with about ``docs_per_row`` EOS per row; row 0 begins with
    EOS and row 1 has two EOS in a row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (batch, seq_len), generator=gen)
    ids[torch.rand(batch, seq_len, generator=gen) < docs_per_row / seq_len] = EOS
    ids[0, 0] = EOS
    ids[1, 100:102] = EOS
    return ids


def assert_bf16_close(actual, expected, what):
    """Within 2⁻⁶ of the largest magnitude (2 to 4 bf16 units in the last place there): the
    flash kernel sees the same bf16 inputs as the fp32 reference, accumulates in fp32 and rounds
    only the softmax probabilities (before P·V) and its results to bf16. On an H200 the errors
    were 2.3e-3 to 5.4e-3 of the largest magnitude, as large as those of bf16 SDPA with the
    dense mask; a misplaced boundary changes outputs by a sizeable fraction of it."""
    error = float((actual.double() - expected.double()).abs().max())
    bound = 2**-6 * float(expected.abs().max())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(16, 16), (16, 4)], ids=["MHA", "GQA"])
def test_emo_shape_matches_the_fp32_reference_on_gpu(heads):
    """B=2, S=4096, 16 query heads x 128, bf16, ~30 documents per row; the exact longest
    document and the row length as max_seqlen give the same result."""
    ids = emo_batch()
    inputs = make_inputs(ids, *heads, 128, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(4096, 2, heads[0] * 128, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
    cu_seqlens, max_seqlen = attention_boundaries(ids.cuda(), EOS)
    assert max_seqlen < 4096 and len(cu_seqlens) > 40
    fp32 = [t.detach().float().requires_grad_() for t in inputs]
    expected = outputs_and_grads(
        lambda q, k, v: reference.document_attention(q, k, v, cu_seqlens, max_seqlen), fp32, grad_out.float()
    )
    assert attention.select_path(inputs[0].device, inputs[0].dtype) == "varlen"
    for bound in (max_seqlen, 4096):
        ours = outputs_and_grads(
            lambda q, k, v, bound=bound: attention.document_attention(q, k, v, cu_seqlens, bound), inputs, grad_out
        )
        for what, a, b in zip(["out", "grad query", "grad key", "grad value"], ours, expected):
            assert a.dtype == torch.bfloat16 and a.shape == b.shape
            assert_bf16_close(a, b, f"{what}, max_seqlen {bound}")


@pytest.mark.gpu
def test_fp32_on_gpu_runs_the_reference_and_says_so(monkeypatch, caplog):
    from megatron_emo import logs

    monkeypatch.setattr(logs, "_logged_once", set())
    ids = torch.tensor(CASES["three rows"])
    q, k, v = make_inputs(ids, *HEADS["GQA"], DIM, dtype=torch.float32, device="cuda")
    cu_seqlens, max_seqlen = attention_boundaries(ids.cuda(), EOS)
    with caplog.at_level(logging.INFO, logger="megatron_emo.kernels.attention"):
        out = attention.document_attention(q, k, v, cu_seqlens, max_seqlen)
    expected = loop_over_documents(*(t.detach().cpu().double() for t in (q, k, v)), ids)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    assert [r.getMessage() for r in caplog.records] == [
        "document_attention: path = reference on cuda: the flash kernel needs bf16 or fp16, not "
        "torch.float32, so the dense [b, 1, s, s] mask is built"
    ]
