"""Process groups for a run: torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's
parallel state."""

import contextlib
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_emo.config import EmoConfig
from megatron_emo.validate import check_layout


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    data_parallel_rank: int
    data_parallel_size: int

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_logging_rank(self) -> bool:
        """The last rank: it holds the last pipeline stage, where the loss is."""
        return self.rank == self.world_size - 1


def init_process_group() -> None:
    """Join (or, for a single process, create) the world: NCCL on GPU, gloo on CPU.

    Launched by ``torchrun`` the environment gives rank and world size; run directly it is a
    world of one.
    """
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        # Before the first collective, so that NCCL uses this rank's GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if on_gpu else "gloo")
    else:
        rendezvous = tempfile.NamedTemporaryFile(prefix="megatron_emo_rdzv_", delete=False).name
        os.unlink(rendezvous)
        dist.init_process_group(
            "nccl" if on_gpu else "gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1
        )


@contextlib.contextmanager
def process_group():
    """The world of the caller, or a one-process gloo world for the block (checkpoints are read
    and written through torch.distributed, also by single-process tools)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="megatron_emo_rdzv_") as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def init_model_parallel(config: EmoConfig, *, seed: int) -> Runtime:
    """Check the layout of ``config`` against the world and set up megatron-core's groups.

    Raises:
        ConfigError: the layout cannot run on this many ranks (the message names the constraint).
    """
    world_size = dist.get_world_size()
    check_layout(config, world_size)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # gloo's batched send/recv pairs the interleaved schedule's concurrent transfers with
        # the wrong micro-batches; one operation at a time is exact.
        config.batch_p2p_comm = False
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
        context_parallel_size=config.context_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return Runtime(
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
        rank=dist.get_rank(),
        world_size=world_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )


def shutdown_distributed(*, destroy_process_group: bool = True) -> None:
    """Tear down megatron-core's groups and (unless the caller owns it) the world."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
