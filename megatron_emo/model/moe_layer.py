"""The EMO MoE layer: route → dispatch → experts → combine, plus the always-on shared expert."""

import copy

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from megatron_emo.config import EmoConfig
from megatron_emo.experts.permute import permute, unpermute
from megatron_emo.experts.routed import RoutedExperts
from megatron_emo.routing.router import DocumentPooledRouter


class EmoMoELayer(MegatronModule):
    """Document-pooled MoE feed-forward layer.

    The shared experts are one dense SwiGLU MLP of width ``emo_num_shared_experts *
    moe_ffn_hidden_size`` (the sum of several always-on SwiGLU experts with weight 1.0 is one
    wider SwiGLU), tensor-parallel as megatron-core's MLP.
    """

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        self.router = DocumentPooledRouter(config)
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

    def forward(self, hidden_states: torch.Tensor, document_ids: torch.Tensor):
        """``hidden_states [s, b, h]``, ``document_ids [b, s]`` → ``(output [s, b, h], None)``."""
        seq_len, batch, hidden = hidden_states.shape
        weights, indices = self.router(hidden_states, document_ids)
        rows, group_sizes, order = permute(
            hidden_states.reshape(-1, hidden), indices, self.config.num_routed_experts
        )
        expert_rows = self.experts(rows, group_sizes)
        output = unpermute(expert_rows, weights, order).view(seq_len, batch, hidden)
        if self.shared_experts is not None:
            shared_output, _ = self.shared_experts(hidden_states)
            output = output + shared_output
        return output, None
