"""The EMO MoE layer: route → dispatch → experts → combine, plus the always-on shared expert."""

import copy

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from megatron_emo.config import EmoConfig
from megatron_emo.experts.routed import RoutedExperts
from megatron_emo.kernels.permutation import permute, unpermute
from megatron_emo.model.document_batch import DocumentBatch
from megatron_emo.parallel import dispatch as expert_parallel
from megatron_emo.parallel.layout import expert_layout
from megatron_emo.routing.router import DocumentPooledRouter


class EmoMoELayer(MegatronModule):
    """Document-pooled MoE feed-forward layer.

    Parallel layouts: the router sees all tokens of the data-parallel rank (it gathers the
    logits under sequence parallelism); the routed experts get the tokens on every TP rank and
    compute their TP slice of every expert, with expert-parallel ranks exchanging rows
    (:mod:`megatron_emo.parallel.dispatch`); the TP ranks' partial outputs are then summed.

    The shared experts are one dense SwiGLU MLP of width ``emo_num_shared_experts *
    moe_ffn_hidden_size`` (the sum of several always-on SwiGLU experts with weight 1.0 is one
    wider SwiGLU), tensor-parallel as megatron-core's MLP.
    """

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        self.router = DocumentPooledRouter(config)
        self.expert_layout = expert_layout(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = None
        if config.emo_num_shared_experts:
            # megatron-core 0.16.1's MLP sizes fc2 from config.ffn_hidden_size whatever
            # ffn_hidden_size it is given, so the shared MLP gets a config copy of its width.
            shared_config = copy.copy(config)
            shared_config.ffn_hidden_size = config.emo_num_shared_experts * config.moe_ffn_hidden_size
            self.shared_experts = MLP(
                shared_config,
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                ffn_hidden_size=shared_config.ffn_hidden_size,
            )

    def set_layer_number(self, layer_number: int) -> None:
        self.router.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor, padding_mask: DocumentBatch):
        """``hidden_states [s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism) and the
        micro-batch's documents (megatron-core's ``padding_mask`` slot, see
        :mod:`megatron_emo.model.layer`) → ``(output shaped as hidden_states, None)``."""
        weights, indices = self.router(hidden_states, padding_mask.segment_ids, padding_mask.training_pools)
        rows, group_sizes, plan = self.dispatch(hidden_states, indices)
        expert_rows = self.experts(rows, group_sizes)
        output = self.combine(expert_rows, weights, plan)
        if self.shared_experts is not None:
            shared_output, _ = self.shared_experts(hidden_states)
            output = output + shared_output
        return output, None

    def dispatch(self, hidden_states: torch.Tensor, indices: torch.Tensor):
        """Tokens to the rows of this rank's experts: ``(rows, group sizes, plan for combine)``."""
        tokens = self._to_expert_region(hidden_states)
        rows, group_sizes, order = permute(tokens.reshape(-1, tokens.shape[-1]), indices, self.expert_layout.num_padded)
        exchange = None
        if self.expert_layout.ep_size > 1:
            rows, group_sizes, exchange = expert_parallel.dispatch(
                rows, group_sizes, parallel_state.get_expert_model_parallel_group()
            )
        return rows, group_sizes, (tokens.shape, order, exchange)

    def combine(self, expert_rows: torch.Tensor, weights: torch.Tensor, plan) -> torch.Tensor:
        """Expert outputs back to the tokens, weighted by their gates, shaped as the layer input."""
        shape, order, exchange = plan
        if exchange is not None:
            expert_rows = expert_parallel.combine(expert_rows, exchange)
        if self.config.tensor_model_parallel_size > 1:
            # Each TP rank combines partial expert outputs, so its gate gradients are partial too.
            weights = copy_to_tensor_model_parallel_region(weights)
        return self._from_expert_region(unpermute(expert_rows, weights, order).view(shape))

    def _to_expert_region(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """All of this data-parallel rank's tokens on every TP rank, as the routed experts need
        them (each TP rank computes a slice of every expert's width): gathered under sequence
        parallelism; the backward sums the TP ranks' partial input gradients."""
        if self.config.tensor_model_parallel_size == 1:
            return hidden_states
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(hidden_states)
        return copy_to_tensor_model_parallel_region(hidden_states)

    def _from_expert_region(self, output: torch.Tensor) -> torch.Tensor:
        """Sum the TP ranks' partial expert outputs (and scatter them back to sequence shards)."""
        if self.config.tensor_model_parallel_size == 1:
            return output
        if self.config.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(output)
        return reduce_from_tensor_model_parallel_region(output)
