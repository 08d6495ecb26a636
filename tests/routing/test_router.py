"""DocumentPooledRouter (megatron_emo.routing.router) on CPU, outside megatron's parallel state."""

import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_emo.benchmark.timeline import host_syncs
from megatron_emo.kernels.routing.reference import route
from megatron_emo.routing import documents
from megatron_emo.routing import router as router_module
from megatron_emo.routing.balance import load_balancing_loss, z_loss
from megatron_emo.routing.router import DocumentPooledRouter
from tests.conftest import make_config

EOS = 2
SEQ, BATCH = 16, 3


@pytest.fixture(autouse=True)
def unit_aux_loss_scale():
    """MoEAuxLossAutoScaler keeps a class-wide scale: pin it to 1 and restore it afterwards."""
    saved = MoEAuxLossAutoScaler.main_loss_backward_scale
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = saved


def make_inputs(config):
    """hidden ``[s, b, h]`` and document ids ``[b, s]`` for a batch with several documents."""
    input_ids = torch.randint(3, config.emo_vocab_size, (BATCH, SEQ))
    input_ids[0, [0, 5, 6, 11]] = EOS  # EOS at 0 (no boundary), a single-token document
    input_ids[1, [3, 9]] = EOS
    input_ids[2, 15] = EOS  # a single-token document at the end; row 2 has 2 documents
    doc_ids = documents.document_ids(
        input_ids, EOS, seed=config.emo_routing_seed, step=4, sample_index=torch.arange(BATCH)
    )
    hidden = torch.randn(SEQ, BATCH, config.hidden_size) * 20  # logits of order 1 at init std 0.02
    return hidden, doc_ids


def segments(config, doc_ids):
    """The router's segment ids and pool table for ``doc_ids``, as a DocumentBatch carries them."""
    pools = documents.TrainingPools.of(config)
    return documents.segment_index(doc_ids), None if pools is None else pools.table(doc_ids)


def make_router(config):
    router = DocumentPooledRouter(config)
    assert router.balance_group() is None
    return router


def router_logits(router, hidden):
    """fp32 logits ``[b, s, E]``."""
    return torch.einsum("sbh,eh->bse", hidden.float(), router.weight.detach())


def reference_routing(router, hidden, doc_ids, token_pools):
    """Route document by document with Python loops (the routing contract).

    Args:
        token_pools: int ``[b, s]`` pool of each token's document, or None for no pool.

    Returns:
        weights, indices ``[s*b, K]`` in sequence-major order, probs ``[b, s, E]``, and the pool
        of every token as a list of sets (row-major), or None.
    """
    logits = router_logits(router, hidden)
    batch, seq, num_experts = logits.shape
    probs = torch.empty_like(logits)
    pools = []
    for row in range(batch):
        starts = [0] + [t for t in range(1, seq) if doc_ids[row, t] != doc_ids[row, t - 1]]
        for start, end in zip(starts, starts[1:] + [seq]):
            seg_logits = logits[row, start:end]
            if token_pools is None:
                probs[row, start:end] = torch.softmax(seg_logits, dim=-1)
                continue
            sums = torch.softmax(seg_logits, dim=-1).sum(0).tolist()
            size = int(token_pools[row, start])
            assert bool((token_pools[row, start:end] == size).all())
            pool = sorted(range(num_experts), key=lambda e: (-sums[e], e))[:size]
            mask = torch.zeros(num_experts, dtype=torch.bool)
            mask[pool] = True
            probs[row, start:end] = torch.softmax(seg_logits.masked_fill(~mask, -math.inf), dim=-1)
            pools += [set(pool)] * (end - start)
    weights, indices = torch.topk(probs, router.config.routed_topk, dim=-1)
    weights, indices = (x.transpose(0, 1).reshape(seq * batch, -1) for x in (weights, indices))
    return weights, indices, probs, (pools or None)


def to_row_major(x):
    """``[s*b, K]`` sequence-major -> ``[b*s, K]`` row-major."""
    return x.view(SEQ, BATCH, -1).transpose(0, 1).reshape(BATCH * SEQ, -1)


def test_constructs_with_routed_experts_only():
    config = make_config()
    router = make_router(config)
    assert router.weight.shape == (8, 16) and router.weight.dtype == torch.float32
    assert config.num_routed_experts == 8 and config.routed_topk == 2
    # The seeded init is a normal of the configured std, not zeros or uninitialised memory.
    assert 0.01 < float(router.weight.detach().std()) < 0.03


@pytest.mark.parametrize("layer_number", [1, 2])
def test_train_mode_routes_inside_sampled_pools(layer_number):
    config = make_config()
    router = make_router(config)
    router.set_layer_number(layer_number)
    router.train()
    hidden, doc_ids = make_inputs(config)
    weights, indices = router(hidden, *segments(router.config, doc_ids))
    assert weights.shape == indices.shape == (SEQ * BATCH, 2)

    token_pools = documents.sample_pool_sizes(doc_ids, layer_number, 3, 8)
    # The test is only meaningful if some pools actually mask experts.
    assert int(token_pools.min()) < 8 and token_pools.unique().numel() > 1
    ref_weights, ref_indices, _, pools = reference_routing(router, hidden, doc_ids, token_pools)
    for token, chosen in enumerate(to_row_major(indices).tolist()):
        assert set(chosen) <= pools[token], (token, chosen, pools[token])
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)


def test_train_mode_needs_the_micro_batchs_pools():
    config = make_config()
    router = make_router(config)
    router.set_layer_number(2)
    hidden, doc_ids = make_inputs(config)
    seg, pools = segments(config, doc_ids)
    with pytest.raises(ValueError, match="carries no pool table.*TrainingPools.of"):
        router(hidden, seg)
    with pytest.raises(ValueError, match="carries a pool table for num_layers=1:"):
        router(hidden, seg, pools[:1])
    router.eval()
    router(hidden, seg)  # eval pools are the config's


def test_train_mode_pools_change_the_routing():
    """Guard for the test above: pooled weights differ from plain top-k ones."""
    config = make_config()
    router = make_router(config)
    hidden, doc_ids = make_inputs(config)
    weights, _ = router(hidden, *segments(router.config, doc_ids))
    plain_weights, _, _, _ = reference_routing(router, hidden, doc_ids, None)
    assert not torch.allclose(weights, plain_weights)


def test_eval_mode_uses_fixed_eval_pool(monkeypatch):
    config = make_config()
    router = make_router(config)
    router.eval()
    hidden, doc_ids = make_inputs(config)
    seen = []

    def spy(*args, **kwargs):
        out = route(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(router_module, "route", spy)
    weights, indices = router(hidden, *segments(router.config, doc_ids))
    probs = seen[0][2]
    assert bool(((probs > 0).sum(-1) == config.emo_eval_pool).all())

    ref_weights, ref_indices, _, _ = reference_routing(
        router, hidden, doc_ids, torch.full_like(doc_ids, config.emo_eval_pool)
    )
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)


def plain_topk(router, hidden):
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ router.weight.detach().t()
    return torch.topk(torch.softmax(logits, dim=-1), router.config.routed_topk, dim=-1)


def test_eval_pool_none_is_plain_topk():
    config = make_config(emo_eval_pool=None)
    router = make_router(config)
    router.eval()
    hidden, doc_ids = make_inputs(config)
    weights, indices = router(hidden, *segments(router.config, doc_ids))
    ref_weights, ref_indices = plain_topk(router, hidden)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize("training", [True, False])
def test_topk_mode_is_plain_topk(training):
    config = make_config(emo_router_mode="topk")
    router = make_router(config)
    router.train(training)
    hidden, doc_ids = make_inputs(config)
    weights, indices = router(hidden, *segments(router.config, doc_ids))
    ref_weights, ref_indices = plain_topk(router, hidden)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights, ref_weights)


def test_metrics_record_losses_and_reset():
    config = make_config()
    router = make_router(config)
    hidden, doc_ids = make_inputs(config)
    assert router.metrics.read() == {}
    router(hidden, *segments(router.config, doc_ids))
    stats = router.metrics.read()
    assert set(stats) >= {"lb_loss", "z_loss", "load_max_over_mean", "pool_experts"}
    assert all(math.isfinite(v) for v in stats.values())

    # The values are those of the masked router outputs.
    token_pools = documents.sample_pool_sizes(doc_ids, 1, 3, 8)
    _, _, probs, _ = reference_routing(router, hidden, doc_ids, token_pools)
    flat_probs = probs.reshape(-1, probs.shape[-1])
    _, indices = torch.topk(flat_probs, 2, dim=-1)
    lb, _ = load_balancing_loss(flat_probs, indices)
    masked = router_logits(router, hidden).reshape(-1, 8).masked_fill(flat_probs == 0, -math.inf)
    assert stats["lb_loss"] == pytest.approx(lb.item(), rel=1e-5)
    assert stats["z_loss"] == pytest.approx(z_loss(torch.logsumexp(masked, -1)).item(), rel=1e-5)
    assert stats["pool_experts"] == pytest.approx(token_pools.double().mean().item(), rel=1e-6)
    unused = 1 - indices.unique().numel() / 8
    assert stats["unused_experts"] == pytest.approx(unused)

    assert router.metrics.read() == {}  # reset by the read


def test_metrics_average_over_microbatches():
    config = make_config()
    router = make_router(config)
    hidden, doc_ids = make_inputs(config)
    router(hidden, *segments(router.config, doc_ids))
    first = router.metrics.read()
    router(hidden * 0.3, *segments(router.config, doc_ids))
    second = router.metrics.read()
    router(hidden, *segments(router.config, doc_ids))
    router(hidden * 0.3, *segments(router.config, doc_ids))
    both = router.metrics.read()
    assert first["z_loss"] != pytest.approx(second["z_loss"])
    for key in ("lb_loss", "z_loss", "pool_experts"):
        assert both[key] == pytest.approx((first[key] + second[key]) / 2, rel=1e-5)


def test_no_metrics_in_eval_or_without_grad():
    config = make_config()
    router = make_router(config)
    hidden, doc_ids = make_inputs(config)
    with torch.no_grad():
        router(hidden, *segments(router.config, doc_ids))
    router.eval()
    router(hidden, *segments(router.config, doc_ids))
    assert router.metrics.read() == {}


def router_grad(config, state, hidden, doc_ids):
    router = make_router(config)
    router.load_state_dict(state)
    weights, _ = router(hidden, *segments(router.config, doc_ids))
    weights.sum().backward()
    return router.weight.grad.clone()


def test_aux_losses_reach_the_router_weight():
    base = make_config(emo_lb_loss_weight=0.0, emo_z_loss_weight=0.0)
    state = make_router(base).state_dict()
    hidden, doc_ids = make_inputs(base)
    grad_none = router_grad(base, state, hidden, doc_ids)
    grad_lb = router_grad(make_config(emo_lb_loss_weight=0.1, emo_z_loss_weight=0.0), state, hidden, doc_ids)
    grad_z = router_grad(make_config(emo_lb_loss_weight=0.0, emo_z_loss_weight=1e-3), state, hidden, doc_ids)
    assert not torch.allclose(grad_lb, grad_none)
    assert not torch.allclose(grad_z, grad_none)

    # The gradient is exactly that of sum(weights) + weight * loss / num_layers, the losses
    # taken on the masked router outputs.
    weight = state["weight"].clone().requires_grad_(True)
    logits = torch.einsum("sbh,eh->bse", hidden, weight).reshape(BATCH * SEQ, -1)
    seg, pools = segments(base, doc_ids)
    gate, indices, probs, lse = route(logits, seg, pools[0], 2, return_logsumexp=True)
    lb, _ = load_balancing_loss(probs, indices)
    for grad, aux in ((grad_lb, 0.1 * lb), (grad_z, 1e-3 * z_loss(lse))):
        (expected,) = torch.autograd.grad(gate.sum() + aux / base.num_layers, weight, retain_graph=True)
        torch.testing.assert_close(grad, expected)


@pytest.mark.gpu
def test_router_on_cuda_matches_cpu():
    router = make_router(make_config()).train()
    x, docs = make_inputs(router.config)
    seg, pools = segments(router.config, docs)
    with torch.no_grad():
        weights, indices = router(x, seg, pools)
        cuda_weights, cuda_indices = router.cuda()(x.cuda(), seg.cuda(), pools.cuda())
    assert torch.equal(cuda_indices.cpu(), indices)
    torch.testing.assert_close(cuda_weights.cpu(), weights, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_router_on_cuda_never_waits_for_the_gpu():
    router = make_router(make_config()).train().cuda()
    x, docs = make_inputs(router.config)
    seg, pools = (t.cuda() for t in segments(router.config, docs))
    x = x.cuda().requires_grad_(True)
    router(x, seg, pools)[0].sum().backward()  # the kernels compiled outside the count
    with host_syncs() as syncs:
        weights, _ = router(x, seg, pools)
        weights.sum().backward()
    assert syncs == {}


def test_router_weight_is_a_normal_truncated_at_three_standard_deviations():
    config = make_config(hidden_size=256, num_moe_experts=65, init_method_std=0.02)
    weight = DocumentPooledRouter(config).weight.detach()
    assert weight.abs().max() <= 0.06
    assert 0.0185 < weight.std() < 0.0205  # a 3-sigma cut keeps 98.7% of the variance
