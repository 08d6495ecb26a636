"""Shared test helpers: a small CPU EmoConfig, a seeded torch RNG for every test, and
megatron-core on the CPU (``megatron_cpu``: model, conversion and dataset tests)."""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

SMALL_CONFIG = dict(
    num_layers=2,
    hidden_size=16,
    num_attention_heads=2,
    num_moe_experts=9,
    moe_router_topk=3,
    moe_ffn_hidden_size=8,
    ffn_hidden_size=32,
    emo_vocab_size=64,
    emo_eos_token_id=2,
    emo_pool_min=3,
    emo_pool_max=8,
    emo_eval_pool=4,
)
"""9 experts (1 shared, 8 routed), top-3 (2 routed), pools 3..8 in training and 4 in eval."""


def make_config(**overrides):
    """A small EmoConfig that builds on CPU, with ``overrides`` applied."""
    from megatron_emo.config import EmoConfig  # megatron-core import is slow: only when used

    return EmoConfig(**{**SMALL_CONFIG, **overrides})


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """``tools/<name>.py`` as a module (the tools are scripts, not a package), with tools/ on
    ``sys.path`` while it loads, for the tools that import their neighbours."""
    sys.path.insert(0, str(TOOLS))
    try:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(TOOLS))


@pytest.fixture(autouse=True)
def seed_torch():
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA, tests marked ``triton_interpret`` CUDA or Triton's CPU
    interpreter: skip them, visibly, where there is neither."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    # Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set for the whole
    # pytest process, not by a fixture.
    skip_interpret = pytest.mark.skip(
        reason="Triton kernel test: needs a CUDA GPU, or TRITON_INTERPRET=1 in the environment "
        "of its own pytest process (TRITON_INTERPRET=1 pytest -m triton_interpret)"
    )
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
        elif "triton_interpret" in item.keywords and not interpreting:
            item.add_marker(skip_interpret)


@pytest.fixture
def megatron_cpu():
    """Enter megatron_emo's CPU mode with TP = PP = 1 in a one-process gloo world; torn down after
    the test (megatron-core's models and its BlendedDataset need torch.distributed). CPU-mode
    tests: on a GPU machine run them with CUDA_VISIBLE_DEVICES= (megatron-core would otherwise
    place tensors on the GPU)."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-mode test: run it with CUDA_VISIBLE_DEVICES= on a GPU machine")
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_emo.training.cpu_mode import cuda_on_cpu

    with tempfile.TemporaryDirectory() as tmp, cuda_on_cpu():
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rdzv')}", rank=0, world_size=1)
        try:
            parallel_state.initialize_model_parallel(1, 1)
            tensor_parallel.model_parallel_cuda_manual_seed(0)
            torch.manual_seed(0)
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
