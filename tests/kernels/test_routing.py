"""The Triton router (megatron_emo.kernels.routing) against the PyTorch reference.

Three tiers:
- unmarked (CPU): the path log line, the error when triton is missing, the import layering;
- ``triton_interpret``: the kernels at small shapes, in Triton's interpreter on CPU
  (``TRITON_INTERPRET=1 pytest -m triton_interpret``, its own process) or natively on a GPU;
- ``gpu``: the EMO shape (B=4, S=4096, ~30 documents per row, 64/127/256 experts, top-7).
Integer outputs (indices, the pool) are compared exactly, except among values the reference
itself ties within 1e-6; floating outputs with fp32 tolerances.
"""

import logging
import math
import subprocess
import sys

import pytest
import torch

from megatron_emo import kernels
from megatron_emo.kernels import routing
from megatron_emo.kernels.routing import reference
from megatron_emo.kernels.routing.segments import segment_ordinals, segment_starts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-6)
TIE = 1e-6
"""Reference probabilities closer than this may be ranked either way by the kernel."""


@pytest.fixture
def impl():
    """The Triton module, imported only by the tests that run it (after TRITON_INTERPRET is set)."""
    from megatron_emo.kernels.routing import triton_impl

    return triton_impl


def make_segments(lengths, device=DEVICE):
    """Contiguous segment ids with arbitrary (non-dense) values, as the API allows."""
    ids = torch.arange(len(lengths)) * 3 + 100
    return torch.repeat_interleave(ids, torch.tensor(lengths)).to(device)


def make_pools(lengths, num_experts, topk, kind, gen):
    """Pool sizes for ``lengths`` segments, longer than the segment count (the tail is unused).

    kind: "random" in [topk, E], "full" (>= E, masks nothing) or None (no pool).
    """
    if kind is None:
        return None
    n = len(lengths)
    if kind == "full":
        pools = torch.tensor([num_experts, num_experts + 50] * n)[:n]
    else:
        pools = torch.randint(topk, num_experts + 1, (n,), generator=gen)
    # Entries past the last segment must be ignored: make them poison (0 and huge).
    return torch.cat([pools, torch.tensor([0, 10**6, 1])]).to(DEVICE)


def make_logits(num_tokens, num_experts, gen, dtype=torch.float32):
    return (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(DEVICE, dtype)


def assert_same_topk(indices, weights, ref_probs):
    """Indices equal the reference's top-K exactly, except where its probabilities tie within
    TIE; there the kernel's choice must still carry the reference's top-K values."""
    topk = indices.shape[1]
    ref_weights, ref_indices = torch.topk(ref_probs, topk, dim=-1)
    ranked = torch.sort(ref_probs, dim=-1, descending=True).values[:, : topk + 1]
    tied = ((ranked[:, :-1] - ranked[:, 1:]) < TIE).any(dim=-1)
    assert torch.equal(indices[~tied], ref_indices[~tied]), "indices differ on untied rows"
    chosen = indices.sort(dim=-1).values
    assert bool((chosen[:, 1:] != chosen[:, :-1]).all()), "an expert chosen twice"
    torch.testing.assert_close(ref_probs.gather(1, indices), ref_weights, **FP32)
    torch.testing.assert_close(weights, ref_weights, **FP32)


def assert_matches_reference(out, ref, rows=slice(None)):
    """Forward outputs ``(weights, indices, probs, lse)`` against the reference's, on ``rows``."""
    weights, indices, probs, lse = (x[rows] for x in out)
    _, _, ref_probs, ref_lse = (x[rows] for x in ref)
    assert torch.equal(probs > 0, ref_probs > 0), "the pools differ"
    torch.testing.assert_close(probs, ref_probs, **FP32)
    torch.testing.assert_close(lse, ref_lse, **FP32)
    assert_same_topk(indices, weights, ref_probs)
    assert torch.equal(weights, probs.gather(1, indices))


def random_lengths(total, count, gen):
    """``count`` segment lengths >= 1 summing to ``total``, cut at random points."""
    cuts = torch.randperm(total - 1, generator=gen)[: count - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])])
    return bounds.diff().tolist()


# Each row: (segment lengths, E, K, pools), the edge case in the comment. BLOCK_T is 16 tokens
# at E=127 and 64 at E=8, so 200 and 257 tokens span several blocks.
CASES = {
    "one token": ([1], 8, 1, "random"),
    "T=7, a 1-token segment between two": ([3, 1, 3], 8, 7, "random"),
    "T=100, one segment": ([100], 127, 7, "random"),
    "T=257, a segment across several blocks": ([1, 200, 56], 127, 7, "random"),
    "T=257, E=8, many segments across blocks": ([1, 70, 1, 1, 130, 54], 8, 1, "random"),
    "T=257, every segment 1 token": ([1] * 257, 8, 7, "random"),
    "T=257, random lengths, K=1": ("random", 127, 1, "random"),
    "pool >= E masks nothing": ([40, 1, 59], 127, 7, "full"),
    "no pool": ([100], 127, 7, None),
    "no pool, E=8, K=7": ([7], 8, 7, None),
}


def case_inputs(case, dtype=torch.float32):
    lengths, num_experts, topk, pool_kind = CASES[case]
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    if lengths == "random":
        lengths = random_lengths(257, 9, gen)
    logits = make_logits(sum(lengths), num_experts, gen, dtype)
    return (
        logits,
        make_segments(lengths),
        make_pools(lengths, num_experts, topk, pool_kind, gen),
        topk,
    )


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(impl, case):
    logits, seg, pools, topk = case_inputs(case)
    out = impl.route(logits, seg, pools, topk, return_logsumexp=True)
    ref = reference.route(logits, seg, pools, topk, return_logsumexp=True)
    assert [x.dtype for x in out] == [x.dtype for x in ref]
    assert [x.shape for x in out] == [x.shape for x in ref]
    assert_matches_reference(out, ref)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("outputs", ["weights", "all"])
def test_backward_matches_reference_autograd(impl, case, outputs):
    """Gradient of weights (and of probs and logsumexp, as the LB and z-losses use them)."""
    logits, seg, pools, topk = case_inputs(case)
    gen = torch.Generator().manual_seed(7)
    grads_out = [
        torch.randn(s, generator=gen).to(DEVICE)
        for s in ((len(logits), topk), logits.shape, (len(logits),))
    ]

    def grad_of(fn):
        x = logits.clone().requires_grad_(True)
        weights, _, probs, lse = fn(x, seg, pools, topk, return_logsumexp=True)
        loss = (weights * grads_out[0]).sum()
        if outputs == "all":
            loss = loss + (probs * grads_out[1]).sum() + (lse * grads_out[2]).sum()
        loss.backward()
        return x.grad

    torch.testing.assert_close(grad_of(impl.route), grad_of(reference.route), rtol=1e-5, atol=1e-6)


@pytest.mark.triton_interpret
def test_gradcheck_float64(impl):
    """fp64 logits stay fp64; logits far from any tie, so the pool and top-K stay put."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randperm(5 * 7, generator=gen).double().view(5, 7) / 35
    logits[:, 4:] -= 5.0  # experts 0..3 form every pool
    logits = logits.to(DEVICE).requires_grad_(True)
    seg, pools = make_segments([3, 2]), torch.tensor([4, 4], device=DEVICE)

    def outputs(x):
        weights, _, probs, lse = impl.route(x, seg, pools, 2, return_logsumexp=True)
        return weights, probs, lse

    assert all(x.dtype == torch.float64 for x in outputs(logits))
    assert torch.autograd.gradcheck(outputs, (logits,))


@pytest.mark.triton_interpret
@pytest.mark.parametrize("num_experts", [8, 127])
def test_exact_ties_go_to_lower_index(impl, num_experts):
    """Identical logits: every segment sum ties, and the pool is the lowest-index experts."""
    logits = torch.zeros(5, num_experts, device=DEVICE)
    pools = [3, num_experts // 2]
    weights, indices, probs = impl.route(
        logits, make_segments([2, 3]), torch.tensor(pools, device=DEVICE), 2
    )
    for rows, pool in ((slice(0, 2), pools[0]), (slice(2, 5), pools[1])):
        eligible = (torch.arange(num_experts, device=DEVICE) < pool).expand_as(probs[rows])
        assert torch.equal(probs[rows] > 0, eligible)
        assert bool((indices[rows] < pool).all())
        torch.testing.assert_close(weights[rows], torch.full_like(weights[rows], 1 / pool))


@pytest.mark.triton_interpret
def test_partial_tie_goes_to_lower_index(impl):
    # Experts 1, 3 and 5 tie for the best sum; a pool of 2 takes experts 1 and 3.
    logits = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0, 2.0]] * 3, device=DEVICE)
    seg = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    _, indices, probs = impl.route(logits, seg, torch.tensor([2], device=DEVICE), 1)
    assert (probs > 0)[0].tolist() == [False, True, False, True, False, False]
    assert indices.flatten().tolist() == [1, 1, 1]  # top-1 tie, lower index


@pytest.mark.triton_interpret
def test_bf16_logits_within_twice_pytorch_bf16_error(impl):
    """bf16 logits against the fp32 reference of the same values; PyTorch's own bf16 softmax
    sets the scale of acceptable error."""
    gen = torch.Generator().manual_seed(11)
    lengths = random_lengths(257, 5, gen)
    logits = make_logits(257, 127, gen, torch.bfloat16)
    seg, pools = make_segments(lengths), make_pools(lengths, 127, 7, "random", gen)
    weights, indices, probs, lse = impl.route(logits, seg, pools, 7, return_logsumexp=True)
    ref = reference.route(logits.float(), seg, pools, 7, return_logsumexp=True)
    assert weights.dtype == probs.dtype == lse.dtype == torch.float32
    mask = ref[2] > 0
    torch_bf16 = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    bound = 2 * float((torch_bf16.float() - ref[2]).abs().max()) + 1e-6
    assert float((probs - ref[2]).abs().max()) <= bound
    assert torch.equal(probs > 0, mask)
    assert_same_topk(indices, weights, ref[2])  # bf16 logits tie often: the tie-aware check
    torch.testing.assert_close(lse, ref[3], **FP32)

    x = logits.clone().requires_grad_(True)
    impl.route(x, seg, pools, 7)[0].sum().backward()
    assert x.grad.dtype == torch.bfloat16


def poisoned(shape, *, dtype, device):
    """Allocation filled with NaN (floats) or a large negative sentinel (integers)."""
    fill = math.nan if dtype.is_floating_point else -(2**30)
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.mark.triton_interpret
@pytest.mark.parametrize(
    "case", ["T=257, a segment across several blocks", "T=257, every segment 1 token", "no pool"]
)
def test_every_element_is_written(impl, case):
    """Outputs and workspaces poisoned before the run: the results are those of a clean run."""
    logits, seg, pools, topk = case_inputs(case)
    clean = impl.route_forward(logits, seg, pools, topk)
    dirty = impl.route_forward(logits, seg, pools, topk, alloc=poisoned)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    gen = torch.Generator().manual_seed(5)
    weights, indices, probs, _ = clean
    grad_w, grad_lse = (
        torch.randn(weights.shape, generator=gen),
        torch.randn(len(logits), generator=gen),
    )
    args = (probs, indices, grad_w.to(DEVICE), None, grad_lse.to(DEVICE), logits.dtype)
    grad = impl.route_backward(*args, alloc=poisoned)
    assert torch.equal(grad, impl.route_backward(*args))
    assert bool(grad.isfinite().all())


@pytest.mark.triton_interpret
def test_non_contiguous_logits_and_determinism(impl):
    gen = torch.Generator().manual_seed(2)
    wide = make_logits(100, 254, gen)
    logits = wide[:, ::2]  # stride 2 along experts
    seg, pools = make_segments([30, 70]), make_pools([30, 70], 127, 7, "random", gen)
    out = impl.route(logits, seg, pools, 7, return_logsumexp=True)
    assert_matches_reference(out, reference.route(logits, seg, pools, 7, return_logsumexp=True))
    for a, b in zip(out, impl.route(logits.contiguous(), seg, pools, 7, return_logsumexp=True)):
        assert torch.equal(a, b)


@pytest.mark.triton_interpret
def test_zero_tokens(impl):
    logits = torch.zeros(0, 127, device=DEVICE)
    seg = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out = impl.route(logits, seg, torch.tensor([7], device=DEVICE), 7, return_logsumexp=True)
    assert [tuple(x.shape) for x in out] == [(0, 7), (0, 7), (0, 127), (0,)]


@pytest.mark.triton_interpret
def test_bad_arguments_are_refused(impl):
    logits = torch.zeros(4, 8, device=DEVICE)
    seg, pools = torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="topk"):
        impl.route(logits, seg, pools, 9)
    with pytest.raises(ValueError, match="segment_ids"):
        impl.route(logits, seg[:3], pools, 2)
    with pytest.raises(ValueError, match="experts"):
        impl.route(torch.zeros(4, impl.MAX_EXPERTS + 1, device=DEVICE), None, None, 2)


# ---------------------------------------------------------------- backend (CPU, no Triton run)


@pytest.fixture
def fresh_log(monkeypatch):
    """Forget which paths were logged, so that this test sees the first log line."""
    from megatron_emo import logs

    monkeypatch.setattr(logs, "_logged_once", set())


def test_cpu_runs_the_reference_and_logs_it_once(monkeypatch, caplog, fresh_log):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, seg = torch.randn(9, 8), make_segments([4, 5], "cpu")
    pools = torch.tensor([3, 5])
    with caplog.at_level(logging.INFO, logger="megatron_emo.kernels.backend"):
        for _ in range(2):
            out = routing.route(logits, seg, pools, 2, return_logsumexp=True)
    for a, b in zip(out, reference.route(logits, seg, pools, 2, return_logsumexp=True)):
        assert torch.equal(a, b)
    assert [r.getMessage() for r in caplog.records] == ["document-pooled routing: path = reference"]


def test_missing_triton_is_an_error_not_a_fallback(monkeypatch, fresh_log):
    """With the Triton path selected and triton unimportable, route raises."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "megatron_emo.kernels.routing.triton_impl", raising=False)
    monkeypatch.delattr(routing, "triton_impl", raising=False)
    with pytest.raises(RuntimeError, match="needs triton"):
        routing.route(torch.randn(3, 8), None, None, 2)


def test_router_routes_through_the_kernels_module():
    from megatron_emo.routing import router

    assert router.route is routing.route


def test_installed_as_megatron_emo_kernels():
    assert kernels.__name__ == "megatron_emo.kernels"


def test_kernels_do_not_import_the_routing_package():
    """kernels is the lower layer: megatron_emo.routing builds on it, never the reverse."""
    code = (
        "import sys\n"
        "import megatron_emo.kernels.routing.reference, megatron_emo.kernels.permutation\n"
        "print(sorted(m for m in sys.modules if m.startswith('megatron_emo.routing')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- EMO shape on a GPU


def emo_batch(num_experts, gen, rows=4, seq=4096, docs_per_row=30):
    """Row-major logits ``[rows * seq, E]``, segment ids, and training pools 8..min(128, E)."""
    lengths = [n for _ in range(rows) for n in random_lengths(seq, docs_per_row, gen)]
    logits = (torch.randn(rows * seq, num_experts, generator=gen) * 2).cuda()
    pools = torch.randint(8, min(128, num_experts) + 1, (rows * seq,), generator=gen).cuda()
    return logits, make_segments(lengths), pools, lengths


def clear_pool_rows(logits, seg, pools, lengths):
    """Tokens of segments whose pool boundary is clear of fp32 rounding (the sums at ranks P and
    P+1 differ by more than 1e-5 of their value, far above the rounding of a sum of positive fp32
    terms); elsewhere the two implementations may legitimately pick different pools."""
    dense = segment_ordinals(segment_starts(seg))
    sums = torch.zeros(len(lengths), logits.shape[1], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, dense, torch.softmax(logits.double(), dim=-1))
    ranked = torch.sort(sums, dim=-1, descending=True).values
    pool = pools[: len(lengths)].clamp(max=logits.shape[1] - 1)
    above, below = ranked.gather(1, pool[:, None] - 1)[:, 0], ranked.gather(1, pool[:, None])[:, 0]
    clear = (above - below > 1e-5 * above) | (pools[: len(lengths)] >= logits.shape[1])
    assert float(clear.float().mean()) > 0.95
    return clear[dense]


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts", [64, 127, 256])
def test_emo_shape_matches_reference_on_gpu(num_experts):
    gen = torch.Generator().manual_seed(num_experts)
    logits, seg, pools, lengths = emo_batch(num_experts, gen)
    out = routing.route(logits, seg, pools, 7, return_logsumexp=True)
    ref = reference.route(logits, seg, pools, 7, return_logsumexp=True)
    assert_matches_reference(out, ref, rows=clear_pool_rows(logits, seg, pools, lengths))
    for a, b in zip(out, routing.route(logits, seg, pools, 7, return_logsumexp=True)):
        assert torch.equal(a, b)  # deterministic: fixed summation order


@pytest.mark.gpu
def test_emo_shape_backward_on_gpu():
    gen = torch.Generator().manual_seed(1)
    logits, seg, pools, lengths = emo_batch(127, gen)
    rows = clear_pool_rows(logits, seg, pools, lengths)
    grads_out = [
        torch.randn(s, generator=gen).cuda()
        for s in ((len(logits), 7), logits.shape, (len(logits),))
    ]

    def grad_of(fn):
        x = logits.clone().requires_grad_(True)
        weights, _, probs, lse = fn(x, seg, pools, 7, return_logsumexp=True)
        (
            (weights * grads_out[0]).sum()
            + (probs * grads_out[1]).sum()
            + (lse * grads_out[2]).sum()
        ).backward()
        return x.grad[rows]

    torch.testing.assert_close(
        grad_of(routing.route), grad_of(reference.route), rtol=1e-4, atol=1e-5
    )


@pytest.mark.gpu
def test_emo_shape_no_pool_and_bf16_on_gpu():
    gen = torch.Generator().manual_seed(2)
    logits, seg, pools, lengths = emo_batch(127, gen)
    out = routing.route(logits, None, None, 7, return_logsumexp=True)
    assert_matches_reference(out, reference.route(logits, None, None, 7, return_logsumexp=True))
    half = logits.bfloat16()
    out = routing.route(half, seg, pools, 7, return_logsumexp=True)
    ref = reference.route(half.float(), seg, pools, 7, return_logsumexp=True)
    rows = clear_pool_rows(half.float(), seg, pools, lengths)
    assert torch.equal(out[2][rows] > 0, ref[2][rows] > 0)
    torch.testing.assert_close(out[2][rows], ref[2][rows], **FP32)
    assert_same_topk(out[1][rows], out[0][rows], ref[2][rows])
