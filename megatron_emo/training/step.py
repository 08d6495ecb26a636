"""One training step, the same for every caller: the trainer (training/loop.py), the throughput
benchmark (benchmark/runner.py) and the layout tests (testing/layouts.py).

    chunks = build_model_chunks(config, ...)            # bare GPTModel pipeline chunks
    trainer = build_trainer(chunks, config, optim, shape, total_steps=..., device=...)
    result = trainer.train_step(microbatches)           # StepResult(loss, grad_norm, applied)

GPU and CPU run the same megatron-core code: DDP over the chunks (contiguous gradient buffers,
the data-parallel and expert-data-parallel reductions, ``finalize_model_grads`` with the
tied-embedding and sequence-parallel sums), the distributed optimizer (fp32 main weights, Adam
sharded over data-parallel ranks) and the pipeline schedules, over NCCL on GPU and gloo on CPU.
The CPU runs them under :func:`megatron_emo.training.cpu_mode.cuda_on_cpu`, which maps
megatron-core's CUDA calls to the CPU, so the layout tests prove the code a cluster runs. The one
difference is where the chunks live (``device``) and their precision, which the config decides
(bf16 on GPU, fp32 on CPU).
"""

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_emo.model.document_batch import DocumentBatch, run_model
from megatron_emo.parallel.shards import chunks_of
from megatron_emo.recipes import OptimConfig
from megatron_emo.training.optimizer import build_optimizer


@dataclass(frozen=True)
class BatchShape:
    """What megatron-core's schedule needs to know of a step's micro-batches (this rank's)."""

    seq_length: int
    micro_batch_size: int
    num_microbatches: int


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-weighted LM loss of the step's whole batch (every rank has it)."""
    grad_norm: float
    """Gradient norm before clipping; NaN when the update was skipped for a non-finite loss."""
    applied: bool
    """False when the loss or the gradient norm was not finite: the weights did not change."""


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed per-token cross-entropy and the token count; megatron-core divides."""
    total = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return total, num_tokens, {"lm_loss": torch.stack([total.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """megatron-core's forward step: one micro-batch (tokens, labels, loss mask, documents)."""
    tokens, labels, loss_mask, documents = next(data_iterator)
    output = run_model(model, tokens, documents, labels=labels)
    return output, functools.partial(_loss_func, loss_mask)


def to_device(batch: dict, documents: DocumentBatch, device) -> tuple:
    """A micro-batch as :func:`forward_step` reads it, on ``device``.

    To a GPU the host tensors go through pinned memory, asynchronously: a copy from pageable
    memory would make the host wait for the GPU to finish the previous micro-batch before it
    could queue the next one, leaving the GPU idle while the host catches up."""
    move = functools.partial(_copy_to, device=torch.device(device))
    return (*(move(batch[key]) for key in ("tokens", "labels", "loss_mask")), documents.apply(move))


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def microbatch_samples(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """Indices in the global batch of each micro-batch of data-parallel rank ``dp_rank``.

    Micro-batch j of every data-parallel rank together is one contiguous slice of the global
    batch, so the ranks' concurrent micro-batches hold the samples one process would run as one
    micro-batch of ``micro_batch_size x dp_size`` (the load-balancing statistics span them).
    """
    for first in range(dp_rank * micro_batch_size, global_batch_size, micro_batch_size * dp_size):
        yield torch.arange(first, first + micro_batch_size)


def mean_loss(losses: list[dict], device: torch.device) -> float:
    """Token-weighted LM loss of the step over the data-parallel ranks, known on every rank
    (the last pipeline stage has it; the others receive it), so all ranks skip alike."""
    totals = torch.zeros(2, device=device)
    if parallel_state.is_pipeline_last_stage():
        totals = torch.stack([item["lm_loss"] for item in losses]).sum(dim=0)
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    total, count = totals.tolist()
    return total / count


def wrap_chunks(model, config, device: torch.device) -> list[DistributedDataParallel]:
    """The chunks on ``device``, in the config's half precision if any, under megatron-core
    DDP, with the schedule hooks megatron-core expects set on ``config``."""
    wrapped = []
    for index, chunk in enumerate(chunks_of(model)):
        chunk = chunk.to(device)
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        # Only the first chunk's buckets overlap their reduction with the backward.
        wrapped.append(DistributedDataParallel(
            config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
            module=chunk,
            disable_bucketing=index > 0,
        ))
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


@dataclass
class Trainer:
    """A built run: the bare chunks (what checkpoints hold), the DDP chunks the schedule runs,
    megatron-core's optimizer and the learning-rate schedule."""

    model: list
    chunks: list[DistributedDataParallel]
    optimizer: object
    scheduler: object
    shape: BatchShape
    device: torch.device

    def train(self, mode: bool = True) -> None:
        for chunk in self.chunks:
            chunk.train(mode)

    def gradients(self, microbatches: Callable[[], Iterator]) -> float:
        """Run the step's micro-batches forward and backward; their mean loss.

        ``microbatches()`` returns a fresh iterator over this rank's micro-batches (as
        :func:`forward_step` reads them); it is called once per pipeline chunk."""
        self.train()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        iterators = [microbatches() for _ in self.chunks]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks,
            num_microbatches=self.shape.num_microbatches,
            seq_length=self.shape.seq_length,
            micro_batch_size=self.shape.micro_batch_size,
            forward_only=False,
        )
        return mean_loss(losses, self.device)

    def update(self) -> tuple[float, bool]:
        """Clip, step the optimizer and, if it stepped, the schedule; (gradient norm, applied)."""
        applied, grad_norm, _ = self.optimizer.step()
        if applied:
            self.scheduler.step(increment=1)
        return (float("nan") if grad_norm is None else float(grad_norm)), bool(applied)

    def train_step(self, microbatches: Callable[[], Iterator],
                   update_span: Callable[[], ContextManager] = contextlib.nullcontext) -> StepResult:
        """One step: gradients, then the update unless the loss is not finite (``update_span``
        is entered around the update, for timing)."""
        loss = self.gradients(microbatches)
        if not math.isfinite(loss):
            return StepResult(loss, float("nan"), False)
        with update_span():
            grad_norm, applied = self.update()
        return StepResult(loss, grad_norm, applied)


def build_trainer(model, config, optim: OptimConfig, shape: BatchShape, *, total_steps: int,
                  device: torch.device) -> Trainer:
    """Wrap ``model`` (a module or this rank's list of pipeline chunks, weights drawn) for
    training and build its optimizer and schedule."""
    # megatron-core keeps the router-loss scale in a class attribute: start from its initial
    # state (a backward outside its schedules leaves a 0-d scale its schedules cannot copy into).
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    bare = chunks_of(model)
    chunks = wrap_chunks(bare, config, device)
    optimizer, scheduler = build_optimizer(chunks, config, optim, total_steps)
    config.grad_scale_func = optimizer.scale_loss
    return Trainer(bare, chunks, optimizer, scheduler, shape, device)
