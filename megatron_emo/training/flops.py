"""Model FLOPs per token and MFU, with the formula written down.

Per token and layer, forward, counting a multiply-add as 2 FLOPs (h hidden, s sequence length,
g·d key/value width, E routed experts, k routed top-k, n shared experts, F expert width)::

    attention projections  2·h·(h + 2·g·d) + 2·h·h
    attention scores       4·s·h              (QKᵀ and AV over the full s×s, as Megatron counts;
                                               causal masking would halve it)
    router                 2·h·E
    experts                (k + n)·3·2·h·F    (SwiGLU: gate, up, down)

plus the LM head 2·h·V per token; training is 3× the forward (backward = 2× forward). Embedding
lookups, norms, softmax and the loss are not counted. EMO's flagship (h 2048, 16 layers, s 4096,
127 routed top-7 + 1 shared of 1024, V 100,352): 9.31 GFLOP per token.
"""

from typing import Optional

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak per GPU (datasheet, no sparsity), by a substring of the device name."""


def training_flops_per_token(config, *, seq_length: int, vocab_size: int) -> float:
    h = config.hidden_size
    kv = config.kv_channels * config.num_query_groups
    attention = 2 * h * (h + 2 * kv) + 2 * h * h + 4 * seq_length * h
    router = 2 * h * config.num_routed_experts
    experts = (config.routed_topk + config.emo_num_shared_experts) * 3 * 2 * h * config.moe_ffn_hidden_size
    forward = config.num_layers * (attention + router + experts) + 2 * h * vocab_size
    return 3.0 * forward


def peak_tflops(device: torch.device) -> Optional[float]:
    """The bf16 peak of the GPU, or None where unknown (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
