"""Dispatch and combine on one rank, tokens to expert-sorted rows and back: the fused kernels of
:mod:`megatron_emo.kernels.permutation` on CUDA, their PyTorch reference on the CPU.

Legend: T tokens, K routed top-k, E experts, N = T*K expert rows.

    tokens [T, h] --sort (token, slot) pairs by expert--> rows [N, h], tokens_per_expert [E]
    expert output [N, h] --× gate weight, sum by token--> [T, h]
"""

from megatron_emo.kernels.permutation import permute, tokens_per_expert, unpermute

__all__ = ["permute", "unpermute", "tokens_per_expert"]
