"""EMO's own HF layout: names and shapes as allenai's EmoForCausalLM, and an exact inverse."""

import pytest
import torch

pytest.importorskip("transformers")

from megatron_emo.convert import hf_folder  # noqa: E402
from megatron_emo.convert.emo_layout import emo_config, from_emo_layout, qwen_config_from_emo, to_emo_layout  # noqa: E402
from tests.convert.test_qwen2_moe import _model  # noqa: E402


@pytest.mark.parametrize("variant, num_shared", [("emo", 1), ("2shared_gqa_tied", 2)])
def test_layout_and_exact_inverse(megatron_cpu, tmp_path, variant, num_shared):
    import json

    model, config, gpt = _model(variant)
    hf_folder.save_hf_model(tmp_path, model.state_dict(), config, gpt)
    qwen = hf_folder.read_hf_weights(tmp_path)
    routed, ffn, h = config.num_routed_experts, config.moe_ffn_hidden_size, config.hidden_size
    emo = to_emo_layout(qwen, num_routed=routed, num_shared=num_shared)
    layer = "model.layers.1."
    assert layer + "pre_attention_layernorm.weight" in emo and layer + "pre_feedforward_layernorm.weight" in emo
    assert not any("shared_expert" in name or "input_layernorm" in name for name in emo)
    gate = emo[layer + "mlp.gate.weight"]
    assert gate.shape == (routed + num_shared, h) and torch.count_nonzero(gate[routed:]) == 0
    assert torch.equal(gate[:routed], qwen[layer + "mlp.gate.weight"])
    for s in range(num_shared):
        expert = f"{layer}mlp.experts.{routed + s}."
        assert emo[expert + "gate_proj.weight"].shape == (ffn, h) and emo[expert + "down_proj.weight"].shape == (h, ffn)
        # The shared expert has weight 1.0 in EMO's layout: undo Qwen2-MoE's doubling.
        torch.testing.assert_close(emo[expert + "down_proj.weight"] * 2,
                                   qwen[layer + "mlp.shared_expert.down_proj.weight"][:, s * ffn:(s + 1) * ffn])
    back = from_emo_layout(emo, num_routed=routed, num_shared=num_shared)
    assert set(back) == set(qwen) and all(torch.equal(back[k], qwen[k]) for k in qwen)
    qwen_config = json.loads((tmp_path / "config.json").read_text())
    emo_cfg = emo_config(qwen_config, num_shared=num_shared)
    assert emo_cfg["model_type"] == "emo" and emo_cfg["num_experts"] == routed + num_shared
    assert emo_cfg["num_experts_per_tok"] == config.moe_router_topk and emo_cfg["num_shared_experts"] == num_shared
    assert emo_cfg["intermediate_size"] == ffn and emo_cfg["norm_topk_prob"] is False
    restored = qwen_config_from_emo(emo_cfg)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
        assert restored[key] == qwen_config[key]
