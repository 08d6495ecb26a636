"""Parallel layouts: which layouts can run, and how routed experts spread over expert-parallel ranks.

The world is megatron-core's grid: dense layers see TP × CP × DP × PP ranks, experts see
ETP × EP × expert-DP × PP ranks (``order="tp-cp-ep-dp-pp"``). An expert-parallel group holds
ranks of one tensor-parallel rank and different data-parallel ranks, so every EP rank brings
tokens of its own.

Routed experts are padded to a multiple of EP: EMO's 127 is prime. The padding experts exist as
weights so that every EP rank holds ``padded / EP`` experts of one shape, but the router has no
logits for them, so no token ever reaches them and they get no gradient.
"""

import math
from dataclasses import dataclass

from megatron.core import parallel_state

from megatron_emo.config import ConfigError


@dataclass(frozen=True)
class ExpertLayout:
    """Routed experts of one layer over the expert-parallel ranks.

    Attributes:
        num_experts: routed experts the router chooses from (the model's real experts).
        ep_size: expert-parallel ranks.
        ep_rank: this rank's index in its expert-parallel group.
    """

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def num_padded(self) -> int:
        """Experts as allocated: ``num_experts`` rounded up to a multiple of ``ep_size``."""
        return math.ceil(self.num_experts / self.ep_size) * self.ep_size

    @property
    def num_local(self) -> int:
        """Experts held by one rank."""
        return self.num_padded // self.ep_size

    @property
    def first_local(self) -> int:
        """Global index of this rank's first expert."""
        return self.ep_rank * self.num_local


def expert_layout(config) -> ExpertLayout:
    """The routed experts of ``config`` over this rank's expert-parallel group (megatron-core's
    parallel state; one rank holding them all when it is not initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return ExpertLayout(config.num_routed_experts)
    return ExpertLayout(
        config.num_routed_experts,
        parallel_state.get_expert_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_rank(),
    )


def data_parallel_size(config, world_size: int) -> int:
    """Data-parallel ranks of the dense layers: world / (TP · PP · CP)."""
    return world_size // (
        config.tensor_model_parallel_size
        * config.pipeline_model_parallel_size
        * config.context_parallel_size
    )


def check_layout(config, world_size: int) -> None:
    """Raise ConfigError naming the first constraint ``world_size`` ranks of ``config`` break.

    ``config`` is an :class:`~megatron_emo.config.EmoConfig` (its layout fields are
    megatron-core's: tensor/pipeline/context/expert model-parallel sizes, expert tensor
    parallel size, sequence_parallel). Heads and query groups against TP are checked by
    megatron-core when the config is built.
    """
    tp, pp, cp = (
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        config.context_parallel_size,
    )
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"{world_size} ranks cannot hold tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp} x context_parallel_size={cp}: launch a multiple "
            f"of {tp * pp * cp} ranks or change the layout"
        )
    if cp != 1:
        raise ConfigError(
            f"context_parallel_size={cp}: context parallelism is not supported yet (the "
            "document-causal attention does not split sequences); set context_parallel_size=1 "
            "and split tokens with sequence_parallel=True and tensor parallelism instead"
        )
    if etp != tp:
        raise ConfigError(
            f"expert_tensor_parallel_size={etp} differs from tensor_model_parallel_size={tp}: "
            "megatron_emo splits experts over the tensor-parallel group only; leave "
            "expert_tensor_parallel_size unset (it defaults to tensor_model_parallel_size)"
        )
    if (world_size // pp) % (ep * etp):
        raise ConfigError(
            f"expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} does not "
            f"divide the {world_size // pp} ranks of a pipeline stage: choose EP so that "
            f"EP x ETP divides world / pipeline_model_parallel_size"
        )
    # (ETP = TP, so this also splits the shared experts, whose width is a multiple of it.)
    if config.moe_ffn_hidden_size % etp:
        raise ConfigError(
            f"moe_ffn_hidden_size={config.moe_ffn_hidden_size} is not divisible by "
            f"expert_tensor_parallel_size={etp}"
        )
    stage_layers = (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage)
    vp = config.virtual_pipeline_model_parallel_size or 1
    if pp > 1 and stage_layers == (None, None) and config.num_layers % (pp * vp):
        raise ConfigError(
            f"num_layers={config.num_layers} cannot be split evenly over "
            f"pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size={vp} "
            "stages: choose stages dividing the layers, or set num_layers_in_first_pipeline_stage / "
            "num_layers_in_last_pipeline_stage for an uneven split"
        )
    if vp > 1 and pp == 1:
        raise ConfigError(
            f"virtual_pipeline_model_parallel_size={vp} needs pipeline parallelism: set "
            "pipeline_model_parallel_size > 1 or leave virtual_pipeline_model_parallel_size unset"
        )
