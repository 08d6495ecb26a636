"""Tile configurations of the grouped-GEMM kernels, and the key they are autotuned by.

Autotuning key (``KEY``, Triton's ``triton.autotune(key=...)``): the output width ``N_OUT``, the
reduction width ``K``, the epilogue, the stride of the weights along their output columns (1 for
the forward, K for the transposed dgrad read, so each layout is tuned on its own) and
``ROWS_PER_EXPERT``, the mean rows per expert rounded up to a power of two (see
:func:`rows_per_expert`). Triton adds the tensors' dtypes. So a training run tunes once per
distinct GEMM of the layer (4 row GEMMs, 2 weight-gradient GEMMs) and never again: the row count
is fixed by the batch, and the actual per-expert counts, which change every step, are not in the
key (reading them would need a host synchronisation). The first call of each key times every
configuration below (about a second of compilation each, once per process).

The Hopper lists (H100, H200): 128-row tiles with 64-wide K steps keep the tensor cores fed from
3-4 shared-memory stages; 64-row tiles serve few rows per expert. At the EMO shape (1024 rows per
expert, h 2048, F 1024) an H100 picked (2026-11-25): fc1 + SwiGLU and the fc2 dgrad + SwiGLU
backward 128 x 128 x 64 (8 warps, 4 stages); fc2 and the fc1 dgrad 128 x 256 x 64 (8 warps, 3
stages); the weight gradients 64-row steps of 256 x 128 or 128 x 256 tiles (8 warps, 3 stages).
Timings between close candidates vary by a few percent from run to run. Under Triton's
interpreter there is one small configuration (16-wide tiles), which also makes the CPU tests'
small shapes span several tiles.
"""

import triton

from megatron_emo.kernels.backend import triton_interpreting

KEY = ["N_OUT", "K", "EPILOGUE", "stride_bn", "ROWS_PER_EXPERT"]
WGRAD_KEY = ["N_OUT", "K", "ROWS_PER_EXPERT"]

INTERPRETING = triton_interpreting()

PLAIN_EPILOGUE, SWIGLU_EPILOGUE, SWIGLU_BWD_EPILOGUE = range(3)
"""The kernel's EPILOGUE values (here, since the configuration pruning reads them)."""
"""Read once, as Triton reads it when the kernels are defined."""


def rows_per_expert(num_rows: int, num_experts: int) -> int:
    """The autotuning bucket of a row count: mean rows per expert, a power of two in [16, 4096]."""
    return min(4096, max(16, triton.next_power_of_2(max(1, num_rows // max(1, num_experts)))))


def _configs(shapes):
    return [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


_INTERPRETER = [(16, 16, 16, 1, 1)]

ROWS_CONFIGS = _configs(
    _INTERPRETER
    if INTERPRETING
    else [
        # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 3),  # 96 KB of stages: two programs per SM, one's epilogue hidden
        (128, 128, 64, 4, 3),
        (256, 128, 64, 8, 3),
        (64, 256, 64, 4, 4),
        (64, 128, 64, 4, 4),
    ]
)
"""Row-tile kernel: BLOCK_M rows x BLOCK_N output columns (with the SwiGLU epilogue, BLOCK_N gate
and BLOCK_N up columns), stepping BLOCK_K along the reduction."""

WGRAD_CONFIGS = _configs(
    _INTERPRETER
    if INTERPRETING
    else [
        # (BLOCK_M = rows per reduction step, BLOCK_N, BLOCK_K = weight rows per tile, ...)
        (64, 128, 128, 8, 4),
        (64, 128, 128, 8, 3),  # two programs per SM
        (64, 256, 128, 8, 3),
        (64, 128, 256, 8, 3),
        (64, 128, 128, 4, 3),
        (32, 128, 128, 4, 5),
    ]
)
"""Weight-gradient kernel: a BLOCK_K x BLOCK_N tile of one expert's weight gradient, stepping
BLOCK_M of the expert's rows."""


SMALL = 256
"""Below this output or reduction width a problem is too small to be worth timing configurations
(tests, tiny models): the first small-tile configuration runs untimed."""


SMALL_CONFIG = _configs([(64, 64, 32, 4, 3)])
"""For small problems; its stages fit in shared memory with fp32 inputs too."""


def _small_problem(args):
    if INTERPRETING or (args["N_OUT"] >= SMALL and args["K"] >= SMALL):
        return None
    return SMALL_CONFIG


def prune_rows_configs(configs, named_args, **kwargs):
    """Small problems: one configuration. The SwiGLU forward holds two accumulators: keep each
    within 128 x 128 fp32 values (more spills registers)."""
    args = {**named_args, **kwargs}
    small = _small_problem(args)
    if small or args["EPILOGUE"] != SWIGLU_EPILOGUE:
        return small or configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128] or configs


def prune_wgrad_configs(configs, named_args, **kwargs):
    """Small problems: one configuration."""
    return _small_problem({**named_args, **kwargs}) or configs
