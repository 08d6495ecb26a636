"""AdamW and the warm-up + cosine schedule: megatron-core's on GPU, torch's AdamW on CPU.

EMO decays every parameter except the input embeddings; both paths do the same.
"""

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_emo.logs import log_once
from megatron_emo.parallel.grads import global_grad_norm
from megatron_emo.parallel.shards import chunks_of
from megatron_emo.training import multi_tensor

from megatron_emo.recipes import OptimConfig

logger = logging.getLogger(__name__)

EMBEDDING_PARAM = "*embedding.word_embeddings.weight"


@dataclass
class Stepper:
    """One optimizer step: ``step()`` clips and updates, and returns the gradient norm and
    whether the update was applied (not with a non-finite gradient norm)."""

    optimizer: object
    scheduler: OptimizerParamScheduler
    step: Callable[[], tuple[float, bool]]
    zero_grad: Callable[[], None]


def _scheduler(optimizer, optim: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style="WSD" if optim.schedule == "wsd" else "cosine",
        wsd_decay_steps=optim.anneal_steps if optim.schedule == "wsd" else None,
        lr_wsd_decay_style="linear",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        # On resume the schedule follows the run's settings at the saved step, so a run
        # extended to more steps re-plans its decay (with unchanged settings it is identical).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def cpu_stepper(model, optim: OptimConfig, total_steps: int) -> Stepper:
    """torch AdamW (megatron-core's optimizers insist on CUDA tensors), clipping by the norm of
    the whole model across ranks."""
    named = [item for chunk in chunks_of(model) for item in chunk.named_parameters()]
    embeddings = [p for name, p in named if fnmatch.fnmatch(name, EMBEDDING_PARAM)]
    others = [p for name, p in named if not fnmatch.fnmatch(name, EMBEDDING_PARAM)]
    groups = [{"params": others, "wd_mult": 1.0}]
    if embeddings:
        groups.append({"params": embeddings, "wd_mult": 0.0})
    optimizer = torch.optim.AdamW(
        groups, lr=0.0, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay
    )
    params = [p for _, p in named]

    def step() -> tuple[float, bool]:
        # The norm of the whole model, whatever the parallel layout (every rank agrees on it).
        grad_norm = float(global_grad_norm(params))
        if not math.isfinite(grad_norm):
            return grad_norm, False
        clip = min(1.0, optim.clip_grad / (grad_norm + 1e-6))
        if clip < 1.0:
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(clip)
        optimizer.step()
        return grad_norm, True

    return Stepper(optimizer, _scheduler(optimizer, optim, total_steps), step, lambda: optimizer.zero_grad(set_to_none=True))


USE_DISTRIBUTED_OPTIMIZER = True
"""ZeRO-1 on every GPU layout (megatron-core's distributed optimizer: fp32 main weights and Adam
moments sharded over data-parallel ranks; with one rank it shards nothing): one optimizer, so
one checkpoint format, which loads under any other layout — EP4 on four GPUs resumes on one."""


def gpu_stepper(model, config, optim: OptimConfig, total_steps: int) -> Stepper:
    """megatron-core's distributed optimizer (fp32 main weights under bf16) over megatron DDP
    model chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey

    multi_tensor.install()

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            adam_eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=USE_DISTRIBUTED_OPTIMIZER,
        ),
        chunks_of(model),
        # Replaces megatron-core's default (no decay on norms and biases) by EMO's rule.
        config_overrides={ParamKey(name=EMBEDDING_PARAM): {"wd_mult": 0.0}},
    )

    fuse_torch_adam(optimizer)

    def step() -> tuple[float, bool]:
        update_successful, grad_norm, _ = optimizer.step()
        return float("nan") if grad_norm is None else float(grad_norm), bool(update_successful)

    def zero_grad() -> None:
        for chunk in chunks_of(model):
            chunk.zero_grad_buffer()
        optimizer.zero_grad()

    return Stepper(optimizer, _scheduler(optimizer, optim, total_steps), step, zero_grad)


def optimizer_parts(optimizer) -> list:
    """The distributed optimizers of a megatron-core optimizer (dense and expert parameters
    have one each)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def torch_adam_parts(optimizer) -> list:
    """The parts of megatron-core's optimizer that step a torch Adam(W): megatron-core 0.16.1
    runs torch's when neither TransformerEngine nor apex provides a FusedAdam."""
    return [part for part in optimizer_parts(optimizer)
            if isinstance(part.optimizer, torch.optim.Adam | torch.optim.AdamW)]


def fuse_torch_adam(optimizer) -> None:
    """Run megatron-core's torch Adam on torch's fused CUDA kernel (a few launches for all
    parameters, near memory bandwidth) instead of its default multi-tensor ``foreach`` path.
    The fused kernel keeps step counts on the parameters' device. Called after building and
    after loading a checkpoint, which restores the param groups' saved options."""
    adams = [part.optimizer for part in torch_adam_parts(optimizer)]
    for adam in adams:
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
    log_once(logger, "optimizer: path = %s", "torch fused AdamW" if adams else "megatron-core FusedAdam")
