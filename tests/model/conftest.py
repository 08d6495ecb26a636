"""megatron-core on the CPU for model tests: a one-process gloo world and parallel state."""

import os
import tempfile

import pytest
import torch


@pytest.fixture
def megatron_cpu():
    """Enter megatron_emo's CPU mode with TP = PP = 1; torn down after the test."""
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


