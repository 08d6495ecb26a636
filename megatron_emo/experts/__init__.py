"""Experts: the grouped SwiGLU routed experts (their permutation is megatron_emo.kernels.permutation)."""
