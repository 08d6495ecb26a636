"""Model FLOPs per token and MFU, with the formula written down.

Per token and layer, forward, counting a multiply-add as 2 FLOPs (h hidden, q = heads·d query
width, g·d key/value width, s sequence length, E routed experts, k routed top-k, F expert
width, S always-on width: the shared experts of an MoE, the whole MLP of a dense model; SwiGLU
MLPs have 3 matrices, plain ones 2)::

    attention projections  2·h·(q + 2·g·d) + 2·q·h
    attention scores       4·s·q              (QKᵀ and AV over the full s×s, as Megatron and
                                               OLMo-core count; ``causal=True`` halves it)
    router                 2·h·E
    routed experts         k·3·2·h·F
    shared experts / MLP   3·2·h·S

plus the LM head 2·h·V per token; training is 3× the forward (backward = 2× forward). Embedding
lookups, norms, softmax and the loss are not counted. EMO's flagship (h 2048, 16 layers, s 4096,
127 routed top-7 + 1 shared of 1024, V 100,352): 9.31 GFLOP per token (8.51 counting causal
attention scores).

A config is an :class:`~megatron_emo.config.EmoConfig`, or a megatron-core ``TransformerConfig``
of a megatron-core MoE (``num_moe_experts`` routed experts, ``moe_shared_expert_intermediate_size``)
or of a dense model (``num_moe_experts=None``).
"""

from typing import Optional

import torch

PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}
"""Dense bf16 peak per GPU (datasheet, no sparsity), by the first key found in the device name
(the SXM parts are plain "H100"/"H200")."""


def _mlp_shape(config) -> tuple[int, int, int, int]:
    """(routed experts, routed top-k, expert width, always-on width) of a layer's MLP."""
    if config.num_moe_experts is None:
        return 0, 0, 0, config.ffn_hidden_size
    if hasattr(config, "emo_num_shared_experts"):
        shared = config.emo_num_shared_experts * config.moe_ffn_hidden_size
        return config.num_routed_experts, config.routed_topk, config.moe_ffn_hidden_size, shared
    shared = config.moe_shared_expert_intermediate_size or 0
    return config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size, shared


def forward_flops_per_token(config, *, seq_length: int, vocab_size: int, causal: bool = False) -> dict[str, float]:
    """Forward FLOPs per token of the whole model, by component (the formula above).

    Returns:
        ``attention_projections``, ``attention_scores``, ``router``, ``routed_experts``,
        ``shared_experts`` (a dense model's MLP), ``lm_head``.
    """
    h = config.hidden_size
    query = config.kv_channels * config.num_attention_heads
    kv = config.kv_channels * config.num_query_groups
    routed, topk, width, always_on = _mlp_shape(config)
    matrices = 3 if config.gated_linear_unit else 2
    per_layer = {
        "attention_projections": 2 * h * (query + 2 * kv) + 2 * query * h,
        "attention_scores": 4 * seq_length * query * (0.5 if causal else 1.0),
        "router": 2 * h * routed,
        "routed_experts": topk * matrices * 2 * h * width,
        "shared_experts": matrices * 2 * h * always_on,
    }
    flops = {name: float(config.num_layers * value) for name, value in per_layer.items()}
    flops["lm_head"] = float(2 * h * vocab_size)
    return flops


def training_flops_per_token(config, *, seq_length: int, vocab_size: int, causal: bool = False) -> float:
    """Forward and backward FLOPs per token: 3× the forward."""
    return 3.0 * sum(forward_flops_per_token(config, seq_length=seq_length, vocab_size=vocab_size,
                                             causal=causal).values())


def peak_tflops(device: torch.device) -> Optional[float]:
    """The bf16 peak of the GPU, or None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
