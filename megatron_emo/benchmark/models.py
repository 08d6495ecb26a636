"""The models the throughput benchmark compares, all megatron-core GPTModels with our attention,
norms, vocabulary and width; only the feed-forward layer differs.

- EMO (``emo`` and ``topk`` router modes): :class:`~megatron_emo.model.moe_layer.EmoMoELayer`.
- megatron-core's MoE: its ``MoELayer`` with ``TopKRouter`` (fp32 logits, softmax then top-k,
  load-balancing and z-loss at EMO's weights), the ``alltoall`` dispatcher, ``SharedExpertMLP``
  and the fastest experts that build here: ``GroupedMLP`` where the ``grouped_gemm`` package
  imports, ``SequentialMLP`` (a loop over experts) otherwise. Without TransformerEngine
  megatron-core 0.16.1 leaves ``moe_utils.te_general_gemm`` undefined, so the router fails; it
  is set to None, which makes the router GEMM ``torch.mm``.
- dense: a SwiGLU MLP as wide as the active experts (routed top-k + shared), the same FLOPs per
  token as the MoE less its router.
"""

import dataclasses

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe import grouped_gemm_util, moe_utils
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_emo.config import EmoConfig
from megatron_emo.model.norm import RMSNorm
from megatron_emo.model.spec import emo_layer_spec

HAVE_TE = moe_utils.HAVE_TE


def mcore_experts() -> str:
    """The experts class megatron-core's MoE gets here (its spec's choice without TE)."""
    return "GroupedMLP" if grouped_gemm_util.grouped_gemm_is_available() else "SequentialMLP"


def transformer_config(config: EmoConfig, **changes) -> TransformerConfig:
    """A plain megatron-core config with every megatron-core field of ``config``, then ``changes``."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig) if f.init}
    return TransformerConfig(**{**fields, **changes})


def mcore_moe_config(config: EmoConfig) -> TransformerConfig:
    """megatron-core's MoE over EMO's routed experts, its shared experts as one shared MLP."""
    shared = config.emo_num_shared_experts * config.moe_ffn_hidden_size
    return transformer_config(
        config,
        num_moe_experts=config.num_routed_experts,
        moe_router_topk=config.routed_topk,
        moe_shared_expert_intermediate_size=shared or None,
        moe_router_pre_softmax=True,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=config.emo_lb_loss_weight / config.num_layers,
        moe_z_loss_coeff=config.emo_z_loss_weight / config.num_layers,
        moe_grouped_gemm=grouped_gemm_util.grouped_gemm_is_available(),
    )


def dense_config(config: EmoConfig) -> TransformerConfig:
    """A dense model whose MLP is as wide as the MoE's active experts."""
    return transformer_config(
        config,
        num_moe_experts=None,
        ffn_hidden_size=config.moe_router_topk * config.moe_ffn_hidden_size,
        moe_ffn_hidden_size=None,
    )


def _block_with_mlp(config: TransformerConfig, mlp: ModuleSpec) -> TransformerBlockSubmodules:
    """EMO's layers (our attention and norms) with megatron-core's layer class and ``mlp``."""
    layer = emo_layer_spec()
    layer = dataclasses.replace(
        layer, module=TransformerLayer, submodules=dataclasses.replace(layer.submodules, mlp=mlp)
    )
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=RMSNorm)


def mcore_moe_block(config: TransformerConfig) -> TransformerBlockSubmodules:
    if not HAVE_TE:
        moe_utils.te_general_gemm = None
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts,
                               moe_grouped_gemm=config.moe_grouped_gemm)
    return _block_with_mlp(config, spec)


def dense_block(config: TransformerConfig) -> TransformerBlockSubmodules:
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                          linear_fc2=RowParallelLinear))
    return _block_with_mlp(config, mlp)
