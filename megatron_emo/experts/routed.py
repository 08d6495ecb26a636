"""Routed SwiGLU experts: ``out = (silu(x W_gate) * (x W_up)) W_down`` per expert, grouped."""

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_emo.config import EmoConfig
from megatron_emo.experts.grouped import grouped_mm


class RoutedExperts(MegatronModule):
    """All routed experts of one layer as stacked weights.

    Parameters: ``fc1`` ``[E, h, 2F]`` (gate columns then up columns) and ``fc2`` ``[E, F, h]``.
    """

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        num_experts, hidden, ffn = (
            config.num_routed_experts,
            config.hidden_size,
            config.moe_ffn_hidden_size,
        )
        self.fc1 = torch.nn.Parameter(torch.empty(num_experts, hidden, 2 * ffn, dtype=config.params_dtype))
        self.fc2 = torch.nn.Parameter(torch.empty(num_experts, ffn, hidden, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.fc1)
            config.output_layer_init_method(self.fc2)

    def forward(self, rows: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """``rows [N, h]`` sorted by expert, ``group_sizes`` int64 ``[E]`` → ``[N, h]``."""
        gate, up = grouped_mm(rows, self.fc1, group_sizes).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.fc2, group_sizes)
