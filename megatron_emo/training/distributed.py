"""Process groups for a run: torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's
parallel state."""

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_emo.config import ConfigError


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


def init_distributed(*, tensor_parallel_size: int, pipeline_parallel_size: int, seed: int) -> Runtime:
    """Join (or, for a single process, create) the process group and set up megatron-core.

    Launched by ``torchrun`` the environment gives rank and world size; run directly it is a
    world of one.
    """
    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("nccl" if on_gpu else "gloo")
        else:
            rendezvous = tempfile.NamedTemporaryFile(prefix="megatron_emo_rdzv_", delete=False).name
            os.unlink(rendezvous)
            dist.init_process_group(
                "nccl" if on_gpu else "gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1
            )
    world_size = dist.get_world_size()
    model_parallel = tensor_parallel_size * pipeline_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} processes cannot hold tensor_model_parallel_size={tensor_parallel_size} "
            f"x pipeline_model_parallel_size={pipeline_parallel_size}: launch a multiple of "
            f"{model_parallel} processes"
        )
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    elif world_size // model_parallel > 1:
        raise ConfigError(
            "data parallelism on the CPU is not supported (megatron-core's DDP and optimizers need "
            f"CUDA): launch tensor x pipeline = {model_parallel} processes, not {world_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
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


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
