"""Experts: token permutation to expert order, grouped SwiGLU routed experts."""
