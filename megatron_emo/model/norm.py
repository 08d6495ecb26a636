"""RMSNorm usable with sequence parallelism, on PyTorch's own ``rms_norm`` (on CUDA its fused
kernel, forward and backward, with fp32 arithmetic on bf16 tensors: tests/model/test_norm.py).

megatron-core's torch norm refuses ``sequence_parallel`` without TransformerEngine or apex;
this one marks its weight so megatron-core sums its gradient over the tensor-parallel group.
"""

import torch

from megatron_emo.config import EmoConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: EmoConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
