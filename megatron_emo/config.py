"""EmoConfig: megatron-core's TransformerConfig plus the EMO router fields, checked up front by
:func:`megatron_emo.validate.check_model`, and :func:`build_emo_config`, the one builder of a
run's EmoConfig.

Expert counting follows EMO: ``num_moe_experts`` counts all experts of a layer, of which the
last ``emo_num_shared_experts`` are always on (weight 1.0) and the rest are routed;
``moe_router_topk`` counts all active experts, shared ones included. EMO: 128 experts, 1 shared,
top-8, so 127 routed experts of which each token picks 7.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import init_method_normal


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


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
        # Imported here: the validator imports this module (ConfigError, the defaults).
        from megatron_emo.validate import check_model

        # EMO's own rules first: they give clearer messages than megatron-core's generic checks.
        check_model(self)
        # EMO's gate is softmax, then top-k: what megatron-core calls pre-softmax routing.
        self.moe_router_pre_softmax = True
        if self.output_layer_init_method is None:
            # EMO initialises every linear layer with the same normal, no depth scaling.
            self.output_layer_init_method = init_method_normal(self.init_method_std)
        super().__post_init__()


TOKENIZER_FIELDS = ("emo_vocab_size", "emo_eos_token_id")
"""EmoConfig fields given by the tokenizer, never by a run's model section."""


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


MODEL_DEFAULTS: dict[str, Any] = {
    field.name: _default(field) for field in dataclasses.fields(EmoConfig) if field.name not in TOKENIZER_FIELDS
}
"""Every field a run's model section may set, with EmoConfig's default."""


def build_emo_config(model: Mapping[str, Any], *, vocab_size: int, eos_token_id: int, on_gpu: bool) -> EmoConfig:
    """The EmoConfig of the model fields ``model`` (a run's model section) for the tokenizer's
    vocabulary and EOS id and the device: bf16 on GPU and fp32 on the CPU unless ``model`` sets
    ``bf16``. megatron-core's own checks raise ConfigError too."""
    bf16 = model.get("bf16", on_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    fields = {"params_dtype": dtype, "pipeline_dtype": dtype, **model, "bf16": bf16}
    try:
        return EmoConfig(**fields, emo_vocab_size=vocab_size, emo_eos_token_id=eos_token_id)
    except ConfigError:
        raise
    except (ValueError, AssertionError) as error:  # megatron-core's own checks (e.g. heads vs TP) raise both
        raise ConfigError(f"model: {error}") from error
