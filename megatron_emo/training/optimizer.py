"""AdamW and the warm-up + cosine (or WSD) schedule: megatron-core's distributed optimizer and
its parameter scheduler, on GPU and on CPU alike.

EMO decays every parameter except the input embeddings.
"""

import logging

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_emo.logs import log_once
from megatron_emo.recipes import OptimConfig
from megatron_emo.training import multi_tensor

logger = logging.getLogger(__name__)

EMBEDDING_PARAM = "*embedding.word_embeddings.weight"


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


def build_optimizer(
    chunks: list, config, optim: OptimConfig, total_steps: int
) -> tuple[object, OptimizerParamScheduler]:
    """megatron-core's distributed optimizer over DDP ``chunks`` and its schedule.

    ZeRO-1 on every layout (fp32 main weights and Adam moments sharded over data-parallel ranks;
    with one rank it shards nothing): one optimizer, so one checkpoint format, which loads under
    any other layout and on either device — EP4 on four GPUs resumes on one, or on the CPU.
    """
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
            use_distributed_optimizer=True,
        ),
        chunks,
        # Replaces megatron-core's default (no decay on norms and biases) by EMO's rule.
        config_overrides={ParamKey(name=EMBEDDING_PARAM): {"wd_mult": 0.0}},
    )
    fuse_torch_adam(optimizer)
    return optimizer, _scheduler(optimizer, optim, total_steps)


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
    """Run megatron-core's torch Adam on torch's fused kernel (on GPU a few launches for all
    parameters, near memory bandwidth) instead of its default multi-tensor ``foreach`` path.
    The fused kernel keeps step counts on the parameters' device, one tensor per parameter.
    Called after building and after loading a checkpoint, which restores the param groups' saved
    options."""
    adams = [part.optimizer for part in torch_adam_parts(optimizer)]
    for adam in adams:
        for group in adam.param_groups:
            group.update(fused=True, foreach=False)
            for param in group["params"]:
                state = adam.state.get(param)
                if state and "step" in state:
                    # A tensor per parameter: megatron-core's load gives every parameter the same
                    # one, which the kernel would then advance once per parameter.
                    state["step"] = state["step"].to(device=param.device, dtype=torch.float32, copy=True)
    log_once(logger, "optimizer: path = %s", "torch fused AdamW" if adams else "megatron-core FusedAdam")
