"""megatron_emo ↔ stock transformers Qwen2-MoE: logits parity, greedy generation, exact round trips."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402

from megatron_emo.convert import hf_folder  # noqa: E402
from megatron_emo.convert import qwen2_moe as q  # noqa: E402
from megatron_emo.model.gpt import build_gpt_model  # noqa: E402
from tests.conftest import make_config  # noqa: E402
from tests.convert.common import hf_greedy, our_greedy, our_logits  # noqa: E402

EOS = 3
VOCAB = 64
ROPE = 10_000
TOLERANCE = 1e-4

VARIANTS = {
    # 8 routed + 1 shared, top-2 routed, MHA, untied embeddings (EMO's shape, small).
    "emo": dict(kwargs={}, share=False),
    # Two shared experts (one shared MLP of width 2F), grouped-query attention, tied embeddings.
    "2shared_gqa_tied": dict(kwargs=dict(emo_num_shared_experts=2, num_moe_experts=10, moe_router_topk=4,
                                         num_query_groups=2), share=True),
    # No shared expert: HF's shared expert gets width 0.
    "no_shared": dict(kwargs=dict(emo_num_shared_experts=0, num_moe_experts=8, moe_router_topk=2,
                                  emo_pool_min=2), share=False),
}


def _config(**kwargs):
    # Weights with std 0.1 (not 0.02) so that every tensor visibly moves the logits.
    fields = dict(hidden_size=32, num_attention_heads=4, init_method_std=0.1, emo_eval_pool=None,
                  emo_eos_token_id=EOS, emo_vocab_size=VOCAB)
    return make_config(**{**fields, **kwargs})


def _model(variant):
    spec = VARIANTS[variant]
    config = _config(**spec["kwargs"])
    gpt = q.GPTSettings(rotary_base=ROPE, share_embeddings=spec["share"], max_position_embeddings=64)
    model = build_gpt_model(config, max_sequence_length=64, rotary_base=ROPE, share_embeddings=spec["share"]).eval()
    with torch.no_grad():  # norms away from 1, so that a swapped norm shows
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5)
    return model, config, gpt


def _load_stock(path):
    model, info = Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _tokens(batch, seq):
    return torch.randint(EOS + 1, VOCAB, (batch, seq))  # no EOS: one document per row


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stock_transformers_gives_our_logits(megatron_cpu, tmp_path, variant):
    model, config, gpt = _model(variant)
    # A small shard size forces several files and an index.
    hf_folder.save_hf_model(tmp_path, model.state_dict(), config, gpt, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "qwen2_moe" and hf_config["norm_topk_prob"] is False
    assert hf_config["num_experts"] == config.num_routed_experts
    assert hf_config["num_experts_per_tok"] == config.routed_topk
    assert hf_config["tie_word_embeddings"] is VARIANTS[variant]["share"]
    assert hf_config["emo_metadata"]["num_shared_experts"] == config.emo_num_shared_experts
    hf = _load_stock(tmp_path)

    tokens = _tokens(3, 24)
    ours = our_logits(model, tokens, EOS)
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape == (3, 24, VOCAB)
    assert ours.std() > 0.3  # the comparison is not between near-zero numbers
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOLERANCE, f"max abs logits difference {diff:.3g}"


def test_same_greedy_generation(megatron_cpu, tmp_path):
    model, config, gpt = _model("emo")
    hf_folder.save_hf_model(tmp_path, model.state_dict(), config, gpt)
    hf = _load_stock(tmp_path)
    for prompt in ([5, 17, 33], [40, 41, 42, 43, 44, 45, 46]):
        ours = our_greedy(model, prompt, 8, EOS)
        assert hf_greedy(hf, prompt, 8) == ours
        assert len(ours) == 8 or ours[-1] == EOS


def test_padded_vocabulary_rows_are_never_generated(megatron_cpu, tmp_path):
    # A tokenizer of 40 pieces padded to 64 rows: generation_config.json suppresses ids 40..63.
    model, config, gpt = _model("emo")
    with torch.no_grad():  # make the padded rows win the argmax unless suppressed
        model.output_layer.weight[40:] *= 10
    hf_folder.save_hf_model(tmp_path, model.state_dict(), config, gpt, tokenizer_vocab_size=40)
    assert json.loads((tmp_path / "generation_config.json").read_text())["suppress_tokens"] == list(range(40, 64))
    hf = _load_stock(tmp_path)
    prompt = [5, 17, 33]
    assert max(our_greedy(model, prompt, 8, EOS)) >= 40
    ours = our_greedy(model, prompt, 8, EOS, suppress=tuple(range(40, 64)))
    assert hf_greedy(hf, prompt, 8) == ours and max(ours) < 40


def test_parity_needs_the_pool_off(megatron_cpu, tmp_path):
    # With an eval pool, our eval-mode model differs from the HF one: that is the documented
    # limit of the format, and the reason parity is defined with emo_eval_pool=None.
    model, config, gpt = _model("emo")
    hf_folder.save_hf_model(tmp_path, model.state_dict(), config, gpt)
    hf = _load_stock(tmp_path)
    pooled = build_gpt_model(_config(emo_eval_pool=2), max_sequence_length=64, rotary_base=ROPE).eval()
    pooled.load_state_dict(model.state_dict())
    tokens = _tokens(2, 24)
    with torch.no_grad():
        assert (our_logits(pooled, tokens, EOS) - hf(tokens).logits).abs().max() > 1e-2


def _random_stock_model(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=8,
                  shared_expert_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                  norm_topk_prob=False, qkv_bias=False, max_position_embeddings=64, eos_token_id=EOS,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4}, tie_word_embeddings=False)
    hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**fields, **overrides}))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(torch.zeros_like(param) if "shared_expert_gate" in name else torch.randn_like(param))
    return hf


def _load_ours(config, gpt, tensors):
    """Load converted tensors into a fresh model, strictly (``_extra_state`` from the model)."""
    model = build_gpt_model(config, max_sequence_length=64, rotary_base=gpt.rotary_base,
                            share_embeddings=gpt.share_embeddings)
    state = model.state_dict()
    assert set(tensors) == {k for k in state if not k.endswith("._extra_state")}
    model.load_state_dict({**state, **tensors}, strict=True)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_hf_megatron_hf_round_trip_is_exact(megatron_cpu, tmp_path, tied):
    stock = _random_stock_model(tie_word_embeddings=tied)
    stock.save_pretrained(tmp_path / "stock")
    original = hf_folder.read_hf_weights(tmp_path / "stock")
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in original  # per-expert on disk

    imported = q.from_hf_config(Qwen2MoeConfig.from_pretrained(tmp_path / "stock"))
    config = imported.emo_config(emo_eval_pool=None)
    assert (config.num_routed_experts, config.emo_num_shared_experts, config.routed_topk) == (6, 2, 2)
    model = _load_ours(config, imported.gpt, q.from_hf_state_dict(original, config, imported.gpt))

    back = q.to_hf_state_dict(model.state_dict(), config, imported.gpt)
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # transformers 5.x's fused in-memory layout converts to the same tensors.
    fused = q.from_hf_state_dict(stock.state_dict(), config, imported.gpt)
    for name, tensor in q.from_hf_state_dict(original, config, imported.gpt).items():
        assert torch.equal(fused[name], tensor), name
    # Written by us and read back, file for file.
    hf_folder.save_hf_model(tmp_path / "ours", model.state_dict(), config, imported.gpt, max_shard_size="30KB")
    rewritten = hf_folder.read_hf_weights(tmp_path / "ours")
    assert rewritten.keys() == original.keys()
    assert all(torch.equal(rewritten[name], tensor) for name, tensor in original.items())
    # And the imported model computes what the stock one computes.
    tokens = _tokens(2, 16)
    with torch.no_grad():
        assert (our_logits(model.eval(), tokens, EOS) - stock.eval()(tokens).logits).abs().max() <= TOLERANCE


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_megatron_hf_megatron_round_trip_is_exact(megatron_cpu, variant):
    model, config, gpt = _model(variant)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    back = q.from_hf_state_dict(q.to_hf_state_dict(state, config, gpt), config, gpt)
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_bf16_model_round_trips_with_an_fp32_router(megatron_cpu):
    # A GPU run keeps bf16 parameters and an fp32 router: the export is bf16 throughout (the
    # router is rounded once); importing gives bf16 weights and the router back in fp32.
    model, config, gpt = _model("emo")
    state = {k: (v if k.endswith("router.weight") else v.bfloat16()) for k, v in model.state_dict().items()
             if not k.endswith("._extra_state")}
    hf = q.to_hf_state_dict(state, config, gpt)
    assert {t.dtype for t in hf.values()} == {torch.bfloat16}
    bf16_config = _config(params_dtype=torch.bfloat16, bf16=True)
    back = q.from_hf_state_dict(hf, bf16_config, gpt)
    for name, tensor in state.items():
        expected = tensor.bfloat16().float() if name.endswith("router.weight") else tensor
        assert back[name].dtype == expected.dtype and torch.equal(back[name], expected), name


def test_mapping_layouts(megatron_cpu):
    # The individual layout decisions, checked on labelled rows rather than through the logits.
    model, config, gpt = _model("2shared_gqa_tied")  # 4 heads, 2 query groups, head_dim 8
    state = model.state_dict()
    hf = q.to_hf_state_dict(state, config, gpt)
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]  # rows: [q0 q1 k0 v0 | q2 q3 k1 v1]
    head = lambda t, i: t[8 * i: 8 * (i + 1)]  # noqa: E731
    assert torch.equal(head(hf["model.layers.0.self_attn.q_proj.weight"], 2), head(qkv, 4))
    assert torch.equal(head(hf["model.layers.0.self_attn.k_proj.weight"], 1), head(qkv, 6))
    assert torch.equal(head(hf["model.layers.0.self_attn.v_proj.weight"], 0), head(qkv, 3))
    fc1 = state["decoder.layers.1.mlp.experts.fc1"]  # [E, h, 2F]: gate columns, then up columns
    assert torch.equal(hf["model.layers.1.mlp.experts.3.gate_proj.weight"], fc1[3, :, :8].T)
    assert torch.equal(hf["model.layers.1.mlp.experts.3.up_proj.weight"], fc1[3, :, 8:].T)
    fc2 = state["decoder.layers.1.mlp.experts.fc2"]  # [E, F, h]
    assert torch.equal(hf["model.layers.1.mlp.experts.3.down_proj.weight"], fc2[3].T)
    shared_fc1 = state["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"]  # [gate (2F rows); up]
    assert torch.equal(hf["model.layers.0.mlp.shared_expert.gate_proj.weight"], shared_fc1[:16])
    assert torch.equal(hf["model.layers.0.mlp.shared_expert.down_proj.weight"],
                       2 * state["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"])
    assert not hf["model.layers.0.mlp.shared_expert_gate.weight"].any()
    assert "lm_head.weight" not in hf  # tied


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(qk_layernorm=True), "QK-norm"),
        (dict(rotary_interleaved=True), "interleaved"),
        (dict(kv_channels=4), "head_dim"),
        (dict(add_qkv_bias=True), "bias"),
    ],
)
def test_refuses_what_qwen2_moe_cannot_express(overrides, message):
    config = _config(**overrides)
    with pytest.raises(q.ConversionError, match=message):
        q.to_hf_config(config, q.GPTSettings())


def test_refuses_a_state_dict_that_does_not_fit(megatron_cpu):
    model, config, gpt = _model("emo")
    state = dict(model.state_dict())
    # What a tensor-parallel rank's shard would look like.
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    state[qkv] = state[qkv][:48]
    del state["decoder.final_layernorm.weight"]
    with pytest.raises(q.ConversionError, match=r"linear_qkv.weight: \(48, 32\), expected \(96, 32\)") as error:
        q.to_hf_state_dict(state, config, gpt)
    assert "final_layernorm" in str(error.value) and "sharded" in str(error.value)


def test_refuses_a_live_shared_expert_gate():
    stock = _random_stock_model()
    hf = dict(stock.state_dict())
    hf["model.layers.1.mlp.shared_expert_gate.weight"] = torch.full((1, 32), 0.01)
    imported = q.from_hf_config(stock.config)
    config = imported.emo_config()
    with pytest.raises(q.ConversionError, match="layers.1.mlp.shared_expert_gate.weight is not zero"):
        q.from_hf_state_dict(hf, config, imported.gpt)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_topk_prob=True), "norm_topk_prob"),
        (dict(shared_expert_intermediate_size=12), "not a multiple"),
        (dict(mlp_only_layers=[1]), "dense layers"),
        (dict(qkv_bias=True), "qkv_bias"),
        (dict(eos_token_id=None), "eos_token_id"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.5}), "whole number"),
    ],
)
def test_refuses_qwen2_moe_configs_we_cannot_express(overrides, message):
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                  moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4,
                  num_experts_per_tok=2, eos_token_id=EOS, norm_topk_prob=False)
    config = Qwen2MoeConfig(**{**fields, **overrides})
    with pytest.raises(q.ConversionError, match=message):
        q.from_hf_config(config)


def test_missing_shard_is_named(megatron_cpu, tmp_path):
    model, config, gpt = _model("emo")
    hf_folder.save_hf_model(tmp_path, model.state_dict(), config, gpt, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(q.ConversionError, match=f"shard {shard.name} named in the index is missing"):
        hf_folder.read_hf_weights(tmp_path)
