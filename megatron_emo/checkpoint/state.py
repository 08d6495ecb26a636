"""What a training checkpoint holds, as one megatron-core sharded state dict, and putting it back.

    {"model":          {one-process name: ShardedTensor}   (megatron_emo.checkpoint.sharded_state)
     "optimizer":      megatron-core's distributed optimizer, "fully_reshardable" format
                       (fp32 main weights and Adam moments by parameter, any layout)
     "optimizer_kind": "megatron-distributed"
     "scheduler":      OptimizerParamScheduler state
     "step":           steps done; the data position and the pools follow from it
     "world_size":     ranks that saved it
     "rng":            every rank's RNG states (restored when resumed on as many ranks)}

Everything but ``rng`` and the tensors is common state, written once. Weights-only checkpoints
(an imported Hugging Face model) hold ``model`` and ``step``.
"""

import logging

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_emo.checkpoint.sharded_state import parameters_by_name, sharded_tensors
from megatron_emo.parallel.shards import chunks_of
from megatron_emo.training.optimizer import fuse_torch_adam, optimizer_parts, torch_adam_parts

logger = logging.getLogger(__name__)

OPTIMIZER_KIND = "megatron-distributed"
"""Checkpoints of earlier versions' CPU runs hold "torch-adamw" state, which is not resumed."""
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
    "chained_optim_avoid_prefix": True,
}
"""megatron-core's distributed optimizer state by model parameter, loadable under any layout;
gathered over gloo into host memory of data-parallel rank 0 only (the default would hold the
whole state in the host memory of every data-parallel rank of a node)."""


def _config(model):
    return chunks_of(model)[0].config


def _with_torch_adam_state(optimizer) -> None:
    """Give every parameter of megatron-core's optimizer its Adam state before a save or load.

    Without TransformerEngine/apex megatron-core 0.16.1 runs torch's Adam, keeps the step count
    in each parameter's state, and its checkpoint code asserts that one exists: an optimizer
    that has not stepped yet (a run stopped at its first step, or one about to load) gets zero
    moments and step 0 — what it would hold anyway.
    """
    for part in torch_adam_parts(optimizer):  # TransformerEngine's/apex's FusedAdam keep step in their groups
        part.init_state_fn(part.optimizer, part.config)
        for param, state in part.optimizer.state.items():
            state.setdefault("step", torch.zeros((), device=param.device))  # where the fused kernel keeps it


def _load_optimizer(optimizer, state) -> None:
    """megatron-core's ``load_state_dict`` with its per-parameter state loaded separately:
    0.16.1 copies every key of a parameter's state into it, and torch Adam's ``step`` is not
    among the loaded tensors (its value comes with the param groups)."""
    parts = optimizer_parts(optimizer)
    states = [state] if len(parts) == 1 else [value for _, value in sorted(state.items())]
    for part, part_state in zip(parts, states):
        param_state = part_state.pop("param_state")
        part.load_state_dict(part_state)
        steps = {param: values.pop("step", None) for param, values in part.optimizer.state.items()}
        part.load_parameter_state_from_fully_reshardable(param_state)
        for param, step in steps.items():
            if step is not None:
                part.optimizer.state[param]["step"] = step
    fuse_torch_adam(optimizer)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _rng_object(state) -> ShardedObject:
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def training_state(model, optimizer, scheduler, step: int, *, is_loading: bool, with_rng: bool = True) -> dict:
    """The sharded state dict of a training checkpoint (see the module docstring); with
    ``is_loading`` its tensors are the buffers to load into."""
    model_state = sharded_tensors(model, _config(model))
    _with_torch_adam_state(optimizer)
    optimizer_state = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "optimizer_kind": OPTIMIZER_KIND,
        "scheduler": scheduler.state_dict(),
        "step": step,
        "world_size": dist.get_world_size(),
    }
    if with_rng:
        state["rng"] = _rng_object(_rng_state() if not is_loading else None)
    return state


def load_model(path, model) -> dict:
    """Load the weights of checkpoint ``path`` (any layout) into this rank's ``model``."""
    loaded = dist_checkpointing.load({"model": sharded_tensors(model, _config(model))}, str(path))
    copy_weights(model, loaded["model"])
    return loaded


def copy_weights(model, weights: dict) -> None:
    with torch.no_grad():
        for name, param in parameters_by_name(model, _config(model)).items():
            param.copy_(weights[name])


def restore(loaded: dict, model, optimizer, scheduler) -> None:
    """Put a loaded :func:`training_state` into the model, optimizer, schedule and RNGs."""
    copy_weights(model, loaded["model"])
    _load_optimizer(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng" in loaded:
        rng = loaded["rng"]
        torch.set_rng_state(rng["cpu"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
