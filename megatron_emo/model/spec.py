"""The one place that plugs megatron_emo into megatron-core's module specs."""

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_emo.config import EmoConfig
from megatron_emo.model.attention import DocumentCausalAttention
from megatron_emo.model.layer import EmoTransformerLayer
from megatron_emo.model.moe_layer import EmoMoELayer
from megatron_emo.model.norm import RMSNorm


def emo_layer_spec() -> ModuleSpec:
    """Pre-norm layer: x + Attn(RMSNorm(x)), then h + MoE(RMSNorm(h)); no QK-norm, no biases."""
    return ModuleSpec(
        module=EmoTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DocumentCausalAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=EmoMoELayer),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def emo_block_spec(config: EmoConfig, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's (or virtual stage's) layers, all MoE, then the final RMSNorm
    (megatron-core builds as many layers as the block spec lists)."""
    return TransformerBlockSubmodules(
        layer_specs=[emo_layer_spec()] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RMSNorm
    )
