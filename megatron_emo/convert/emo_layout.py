"""EMO's own Hugging Face layout (allenai's ``EmoForCausalLM``, remote code) ↔ our Qwen2-MoE export.

For users of the EMO model card, whose modeling code loads with ``trust_remote_code``. The
layout differs from Qwen2-MoE only in names and in where the shared experts live: the norms are
``pre_attention_layernorm`` / ``pre_feedforward_layernorm``; the shared experts are the last
experts of ``mlp.experts`` (weight 1.0, no gate), after the routed ones, and ``mlp.gate.weight``
has a row for each of them that routing never uses (written as zeros). Our shared MLP of width
``n_shared * F`` splits exactly into ``n_shared`` experts of width ``F`` (a SwiGLU is a sum over
its hidden units).
"""

import json
import os
from pathlib import Path

import torch

from megatron_emo.convert import hf_folder
from megatron_emo.convert.qwen2_moe import SHARED_DOWN_SCALE, ConversionError

_RENAMES = {"input_layernorm.": "pre_attention_layernorm.", "post_attention_layernorm.": "pre_feedforward_layernorm."}


def _layer_of(name: str) -> str:
    return ".".join(name.split(".")[:3]) + "."


def to_emo_layout(tensors: dict, *, num_routed: int, num_shared: int) -> dict:
    """Qwen2-MoE export tensors → EMO layout tensors."""
    out = {}
    for name, tensor in tensors.items():
        layer = _layer_of(name)
        if ".mlp.shared_expert_gate." in name:
            continue
        if ".mlp.shared_expert." in name:
            kind = name.split(".")[-2]  # gate_proj, up_proj or down_proj
            if kind == "down_proj":
                tensor = tensor / SHARED_DOWN_SCALE  # EMO's shared experts have weight 1.0, no gate
            pieces = tensor.chunk(num_shared, dim=1 if kind == "down_proj" else 0) if num_shared else ()
            for s, piece in enumerate(pieces):
                out[f"{layer}mlp.experts.{num_routed + s}.{kind}.weight"] = piece.contiguous()
            continue
        if name.endswith(".mlp.gate.weight"):
            tensor = torch.cat([tensor, tensor.new_zeros(num_shared, tensor.shape[1])])
        for old, new in _RENAMES.items():
            name = name.replace("." + old, "." + new)
        out[name] = tensor
    return out


def from_emo_layout(tensors: dict, *, num_routed: int, num_shared: int) -> dict:
    """EMO layout tensors → Qwen2-MoE export tensors (the inverse of :func:`to_emo_layout`)."""
    out, shared = {}, {}
    for name, tensor in tensors.items():
        layer = _layer_of(name)
        if ".mlp.experts." in name and int(name.split(".")[5]) >= num_routed:
            shared.setdefault(layer, {}).setdefault(name.split(".")[-2], {})[int(name.split(".")[5])] = tensor
            continue
        if name.endswith(".mlp.gate.weight"):
            if tensor.shape[0] != num_routed + num_shared:
                raise ConversionError(
                    f"{name} has {tensor.shape[0]} rows, expected {num_routed} routed + {num_shared} shared"
                )
            tensor = tensor[:num_routed]
        for old, new in _RENAMES.items():
            name = name.replace("." + new, "." + old)
        out[name] = tensor
    for layer, kinds in shared.items():
        for kind, experts in kinds.items():
            parts = [experts[e] for e in sorted(experts)]
            if len(parts) != num_shared:
                raise ConversionError(f"{layer}: {len(parts)} shared experts' {kind}, expected {num_shared}")
            merged = torch.cat(parts, dim=1 if kind == "down_proj" else 0)
            out[f"{layer}mlp.shared_expert.{kind}.weight"] = (
                merged * SHARED_DOWN_SCALE if kind == "down_proj" else merged
            )
        hidden = out[f"{layer}mlp.shared_expert.gate_proj.weight"].shape[1]
        out[f"{layer}mlp.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=parts[0].dtype)
    return out


def emo_config(qwen_config: dict, *, num_shared: int) -> dict:
    """config.json of the EMO layout from our Qwen2-MoE config.json (``emo_metadata`` kept)."""
    ffn = qwen_config["moe_intermediate_size"]
    config = {
        key: qwen_config[key]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "emo_metadata")
        if key in qwen_config
    }
    rope = qwen_config.get("rope_parameters") or {}
    config.update(
        model_type="emo",
        architectures=["EmoForCausalLM"],
        intermediate_size=ffn,
        num_experts=qwen_config["num_experts"] + num_shared,
        num_experts_per_tok=qwen_config["num_experts_per_tok"] + num_shared,
        num_shared_experts=num_shared,
        norm_topk_prob=False,
        attention_bias=False,
        attention_dropout=0.0,
        rope_theta=rope.get("rope_theta", qwen_config.get("rope_theta")),
        rope_scaling=None,
        output_router_logits=True,
    )
    return config


def rewrite_folder_as_emo(folder: os.PathLike, *, num_shared: int, max_shard_size="5GB") -> None:
    """Turn one of our Qwen2-MoE export folders into EMO's layout, in place."""
    folder = Path(folder)
    qwen_config = json.loads((folder / "config.json").read_text())
    tensors = to_emo_layout(hf_folder.read_hf_weights(folder), num_routed=qwen_config["num_experts"],
                            num_shared=num_shared)
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    hf_folder.write_hf_tensors(folder, tensors, max_shard_size=max_shard_size)
    (folder / "config.json").write_text(json.dumps(emo_config(qwen_config, num_shared=num_shared), indent=2) + "\n")


def qwen_config_from_emo(config: dict) -> dict:
    """The Qwen2-MoE config.json fields of an EMO-layout config (the inverse of :func:`emo_config`)."""
    num_shared = config.get("num_shared_experts", 1)
    qwen = {key: value for key, value in config.items() if key not in ("model_type", "architectures", "auto_map")}
    qwen.update(
        model_type="qwen2_moe",
        moe_intermediate_size=config["intermediate_size"],
        shared_expert_intermediate_size=num_shared * config["intermediate_size"],
        num_experts=config["num_experts"] - num_shared,
        num_experts_per_tok=config["num_experts_per_tok"] - num_shared,
        norm_topk_prob=config.get("norm_topk_prob", False),
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        qkv_bias=config.get("attention_bias", False),
    )
    for key in ("num_shared_experts", "rope_scaling", "output_router_logits", "attention_bias"):
        qwen.pop(key, None)
    return qwen
