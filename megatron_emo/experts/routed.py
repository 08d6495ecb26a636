"""Routed SwiGLU experts: ``out = (silu(x W_gate) * (x W_up)) W_down`` per expert, grouped.

The FFN is :func:`megatron_emo.kernels.grouped_gemm.grouped_swiglu_ffn`: Triton grouped GEMMs
with the SwiGLU in fc1's epilogue on CUDA (bf16), the per-expert reference loop on the CPU.
"""

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule

from megatron_emo.config import EmoConfig
from megatron_emo.kernels.grouped_gemm import grouped_swiglu_ffn
from megatron_emo.parallel.layout import expert_layout
from megatron_emo.parallel.shards import init_routed_experts


class RoutedExperts(MegatronModule):
    """All routed experts of one layer as stacked weights.

    Parameters: ``fc1`` ``[E, h, 2F]`` (gate columns then up columns) and ``fc2`` ``[E, F, h]``,
    where E counts this rank's experts and F its share of their width (see
    :mod:`megatron_emo.parallel.shards`).
    """

    def __init__(self, config: EmoConfig):
        super().__init__(config)
        # This rank's experts (padded to a multiple of EP) and its expert-tensor-parallel share
        # of their width.
        layout = expert_layout(config)
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size // config.expert_tensor_parallel_size
        self.fc1 = torch.nn.Parameter(torch.empty(layout.num_local, hidden, 2 * ffn, dtype=config.params_dtype))
        self.fc2 = torch.nn.Parameter(torch.empty(layout.num_local, ffn, hidden, dtype=config.params_dtype))
        for param, width_dim in ((self.fc1, 2), (self.fc2, 1)):
            # Split over TP along the expert width. Expert parameters under every layout, EP1
            # included: megatron-core's DDP reduces them over the expert-data-parallel group and
            # its optimizer keeps them in a part of their own, so a checkpoint's optimizer state
            # has the same structure whatever the expert-parallel size it is saved or loaded with.
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=width_dim, stride=1)
            param.allreduce = False
        if config.perform_initialization:
            init_routed_experts(self.fc1, self.fc2, config, layout)

    def forward(self, rows: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """``rows [N, h]`` sorted by expert, ``group_sizes`` int64 ``[E]`` → ``[N, h]``."""
        return grouped_swiglu_ffn(rows, self.fc1, self.fc2, group_sizes)
