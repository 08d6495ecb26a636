"""EmoConfig: megatron-core's TransformerConfig plus the EMO router fields, validated up front.

Expert counting follows EMO: ``num_moe_experts`` counts all experts of a layer, of which the
last ``emo_num_shared_experts`` are always on (weight 1.0) and the rest are routed;
``moe_router_topk`` counts all active experts, shared ones included. EMO: 128 experts, 1 shared,
top-8, so 127 routed experts of which each token picks 7.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import init_method_normal

ROUTER_MODES = ("emo", "topk")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


UNSUPPORTED_MEGATRON_OPTIONS = (
    ("attention_dropout", 0.0, "the variable-length flash attention kernel has no dropout"),
    ("mlp_chunks_for_prefill", 1, "the MoE layer needs the whole micro-batch's documents"),
    ("fused_single_qkv_rope", False, "megatron-core does not fuse it with packed-sequence parameters"),
    ("cuda_graph_impl", "none", "megatron-core's CUDA graphs exclude packed-sequence parameters"),
)
"""megatron-core fields that EMO's layers do not honour: (name, the one value that works, why)."""


@dataclass(kw_only=True)
class EmoConfig(TransformerConfig):
    emo_vocab_size: int
    """Size of the model's (padded) vocabulary, to check the EOS id against."""

    emo_eos_token_id: int
    """Token that separates documents; a router segment starts at every EOS."""

    emo_router_mode: str = "emo"
    """``emo``: document-pooled routing; ``topk``: the standard-MoE baseline (no pool)."""

    emo_num_shared_experts: int = 1
    """Always-on experts with weight 1.0, counted in ``num_moe_experts`` and ``moe_router_topk``."""

    emo_pool_min: int = 8
    """Smallest training pool (routed experts a document may use), drawn per document and layer."""

    emo_pool_max: int = 128
    """Largest training pool; a pool at least the number of routed experts masks nothing."""

    emo_eval_pool: Optional[int] = 32
    """Fixed pool in eval mode; None evaluates with no pool (as the Hugging Face model runs)."""

    emo_lb_loss_weight: float = 0.1
    """Load-balancing loss weight of the whole model; each layer gets weight / num_layers."""

    emo_z_loss_weight: float = 1e-3
    """Router z-loss weight of the whole model; each layer gets weight / num_layers."""

    emo_routing_seed: int = 12536
    """Seed of the counter-based hash that draws pool sizes."""

    # EMO's architecture as defaults of megatron-core fields: SwiGLU experts without biases,
    # RMSNorm, no dropout; weights built on the CPU (no CUDA calls in constructors).
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    add_bias_linear: bool = False
    normalization: str = "RMSNorm"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-6
    use_cpu_initialization: bool = True

    @property
    def num_routed_experts(self) -> int:
        return self.num_moe_experts - self.emo_num_shared_experts

    @property
    def routed_topk(self) -> int:
        return self.moe_router_topk - self.emo_num_shared_experts

    def __post_init__(self):
        # EMO's own rules first: they give clearer messages than megatron-core's generic checks.
        self.validate_emo()
        # EMO's gate is softmax, then top-k: what megatron-core calls pre-softmax routing.
        self.moe_router_pre_softmax = True
        if self.output_layer_init_method is None:
            # EMO initialises every linear layer with the same normal, no depth scaling.
            self.output_layer_init_method = init_method_normal(self.init_method_std)
        super().__post_init__()

    def validate_emo(self) -> None:
        """Raise ConfigError for the first EMO field that cannot work."""
        if not self.gated_linear_unit or self.add_bias_linear:
            raise ConfigError(
                f"gated_linear_unit={self.gated_linear_unit}, add_bias_linear="
                f"{self.add_bias_linear}: EMO's experts are gated (SwiGLU) and have no biases; "
                "leave both at their defaults"
            )
        if self.emo_router_mode not in ROUTER_MODES:
            raise ConfigError(
                f"emo_router_mode={self.emo_router_mode!r} is unknown: use one of {ROUTER_MODES}"
            )
        if self.num_moe_experts is None or self.num_moe_experts < 1:
            raise ConfigError(
                f"num_moe_experts={self.num_moe_experts}: an EMO model needs experts in every "
                "layer; set num_moe_experts (EMO: 128)"
            )
        if not 0 <= self.emo_num_shared_experts < self.num_moe_experts:
            raise ConfigError(
                f"emo_num_shared_experts={self.emo_num_shared_experts} must be in "
                f"[0, num_moe_experts={self.num_moe_experts}): at least one expert must be routed; "
                "lower emo_num_shared_experts (EMO: 1)"
            )
        if not 1 <= self.routed_topk <= self.num_routed_experts:
            raise ConfigError(
                f"moe_router_topk={self.moe_router_topk} leaves {self.routed_topk} routed choices "
                f"per token (after {self.emo_num_shared_experts} shared); it must be in "
                f"[1, {self.num_routed_experts}] routed experts: set moe_router_topk to between "
                f"{self.emo_num_shared_experts + 1} and {self.num_moe_experts}"
            )
        if self.emo_pool_min > self.emo_pool_max:
            raise ConfigError(
                f"emo_pool_min={self.emo_pool_min} > emo_pool_max={self.emo_pool_max}: "
                "lower emo_pool_min or raise emo_pool_max"
            )
        for name in ("emo_pool_min", "emo_eval_pool"):
            pool = getattr(self, name)
            if pool is not None and pool < self.routed_topk:
                raise ConfigError(
                    f"{name}={pool} is smaller than the routed top-k ({self.routed_topk} = "
                    f"moe_router_topk {self.moe_router_topk} - emo_num_shared_experts "
                    f"{self.emo_num_shared_experts}): a pool must hold every expert a token "
                    f"picks; raise {name} to at least {self.routed_topk}"
                )
        if self.emo_vocab_size < 1:
            raise ConfigError(f"emo_vocab_size={self.emo_vocab_size} must be positive")
        if not 0 <= self.emo_eos_token_id < self.emo_vocab_size:
            raise ConfigError(
                f"emo_eos_token_id={self.emo_eos_token_id} is outside the vocabulary "
                f"[0, {self.emo_vocab_size}): use the tokenizer's EOS id"
            )
        for name in ("emo_lb_loss_weight", "emo_z_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
        for name, supported, why in UNSUPPORTED_MEGATRON_OPTIONS:
            if getattr(self, name) != supported:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported ({why}): leave it at {supported!r}")
