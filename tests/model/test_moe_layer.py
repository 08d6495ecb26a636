import torch
import torch.nn.functional as F

from megatron_emo.model.document_batch import DocumentBatch
from megatron_emo.model.moe_layer import EmoMoELayer
from megatron_emo.routing.documents import TrainingPools, document_ids, sample_pool_sizes, segment_index
from tests.conftest import make_config as model_config

EOS = 2


def _tokens(batch, seq, eos_every=5):
    ids = torch.randint(4, 64, (batch, seq))
    ids[:, eos_every::eos_every] = EOS
    return ids


def _docs(config, tokens):
    return DocumentBatch.of(tokens, EOS, seed=1, step=3, sample_index=torch.arange(tokens.shape[0]),
                            pools=TrainingPools.of(config))


def _swiglu(x, fc1, fc2):
    gate, up = (x @ fc1).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2


def test_one_expert_top1_equals_dense_swiglu(megatron_cpu):
    # One routed expert, top-1, no shared expert: the gate weight is softmax of one logit = 1.
    config = model_config(num_moe_experts=1, moe_router_topk=1, emo_num_shared_experts=0,
                          emo_pool_min=1, emo_pool_max=1, emo_eval_pool=1)
    layer = EmoMoELayer(config)
    x = torch.randn(6, 2, config.hidden_size)
    out, bias = layer(x, _docs(config, _tokens(2, 6)))
    assert bias is None
    dense = _swiglu(x, layer.experts.fc1[0], layer.experts.fc2[0])
    torch.testing.assert_close(out, dense)


def test_output_is_weighted_experts_plus_shared_expert(megatron_cpu):
    config = model_config()
    layer = EmoMoELayer(config).eval()
    s, b = 10, 2
    x = torch.randn(s, b, config.hidden_size)
    docs = _docs(config, _tokens(b, s))
    out, _ = layer(x, docs)
    weights, indices = layer.router(x, docs.segment_ids)
    tokens = x.reshape(-1, config.hidden_size)
    expected = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):  # explicit loop: the reference of the vectorised dispatch
        for w, e in zip(weights[t], indices[t]):
            expected[t] += w * _swiglu(tokens[t], layer.experts.fc1[e], layer.experts.fc2[e])
    shared = layer.shared_experts
    gate, up = F.linear(tokens, shared.linear_fc1.weight).chunk(2, dim=-1)
    expected += F.linear(F.silu(gate) * up, shared.linear_fc2.weight)  # weight exactly 1.0
    torch.testing.assert_close(out.reshape(-1, config.hidden_size), expected, rtol=1e-5, atol=1e-5)


def test_training_routes_inside_sampled_pools(megatron_cpu):
    config = model_config()
    layer = EmoMoELayer(config)
    layer.set_layer_number(2)
    s, b = 12, 3
    x = torch.randn(s, b, config.hidden_size)
    tokens = _tokens(b, s, eos_every=4)
    docs = _docs(config, tokens)
    logits = (x.reshape(-1, config.hidden_size) @ layer.router.weight.t()).view(s, b, -1)
    _, indices = layer.router(x, docs.segment_ids, docs.training_pools)
    indices = indices.view(s, b, -1).transpose(0, 1).reshape(b * s, -1)
    probs = logits.transpose(0, 1).reshape(b * s, -1).softmax(-1)
    ids = document_ids(tokens, EOS, seed=1, step=3, sample_index=torch.arange(b))
    seg = segment_index(ids)
    pools = sample_pool_sizes(ids, 2, config.emo_pool_min, config.emo_pool_max).flatten()
    for segment in seg.unique():
        rows = seg == segment
        pool = probs[rows].sum(0).argsort(descending=True, stable=True)[: pools[rows][0]]
        assert set(indices[rows].flatten().tolist()) <= set(pool.tolist())


def test_gradients_match_finite_differences(megatron_cpu):
    # Router and experts in float64; eval mode fixes the pool, so the routing is a fixed choice
    # and the layer is differentiable in the inputs, the router weight and the experts.
    config = model_config(params_dtype=torch.float64)
    layer = EmoMoELayer(config).double().eval()
    s, b = 5, 2
    x = torch.randn(s, b, config.hidden_size, dtype=torch.float64, requires_grad=True)
    docs = _docs(config, _tokens(b, s, eos_every=3))
    names = ("router.weight", "experts.fc1", "experts.fc2", "shared_experts.linear_fc1.weight")
    params = dict(layer.named_parameters())
    inputs = (x,) + tuple(params[name].detach().clone().requires_grad_() for name in names)

    def forward(x, *weights):
        return torch.func.functional_call(layer, dict(zip(names, weights)), (x, docs))[0]

    assert torch.autograd.gradcheck(forward, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
