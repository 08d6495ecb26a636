"""Parallel layouts: the layout fields, and how routed experts spread over expert-parallel ranks
(which layouts can run: :func:`megatron_emo.validate.check_layout`).

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

PARALLEL_FIELDS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
    "context_parallel_size",
    "sequence_parallel",
)
"""The model fields of a parallel layout (megatron-core's): how a model is laid out over ranks,
not what it computes."""


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
