"""Model and CPU-optimizer state in one-process form, whatever the parallel layout.

Checkpoints store what one process would hold (see :mod:`megatron_emo.parallel.shards`): the
weights by one-process parameter name, and torch AdamW's moments the same way. Any layout can
save (rank 0 gathers) and any layout can load (every rank slices its part), so a run saved on
TP2 × EP2 resumes on one process and the other way round.

    {"exp_avg": {name: tensor}, "exp_avg_sq": {name: tensor}, "step": float}

The groups' hyper-parameters are the run's (learning rate and weight decay come back with the
scheduler's state), so they are not stored.
"""

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_emo.parallel.shards import chunks_of, full_tensors, local_tensors, parameter_shards

MOMENTS = ("exp_avg", "exp_avg_sq")


def _config(model):
    return chunks_of(model)[0].config


def full_weights(model) -> Optional[dict[str, torch.Tensor]]:
    """One-process weights on rank 0 (None elsewhere); every rank must call it. ``model``: a
    module or this rank's list of pipeline chunks."""
    return full_tensors(model, _config(model), lambda param: param)


def full_optimizer_state(model, optimizer: torch.optim.Optimizer) -> Optional[dict]:
    """One-process form of a torch Adam/AdamW state on rank 0 (None elsewhere)."""
    state = {key: full_tensors(model, _config(model), lambda param, key=key: optimizer.state.get(param, {}).get(key))
             for key in MOMENTS}
    if dist.get_rank() != 0:
        return None
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    state["step"] = steps.pop() if steps else 0.0
    return state


def load_full_optimizer_state(model, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore this rank's slice of a :func:`full_optimizer_state`."""
    config = _config(model)
    moments = {key: local_tensors(model, config, state[key]) for key in MOMENTS}
    optimizer.state.clear()
    for param, spec in parameter_shards(model, config):
        if spec.full_name in moments["exp_avg"]:
            optimizer.state[param] = {
                "step": torch.tensor(state["step"]),
                **{key: moments[key][spec.full_name].to(param.dtype).clone() for key in MOMENTS},
            }


def full_parameter_shapes(model) -> dict[str, tuple]:
    """One-process name → shape of the parameters of every rank (gathered; every rank must call
    it)."""
    config = _config(model)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shapes = {}
    for param, spec in parameter_shards(model, config):
        shape = list(param.shape)
        if spec.tp_dim is not None:
            shape[spec.tp_dim] *= tp_size
        if spec.expert:
            shape[0] = config.num_routed_experts
        shapes[spec.full_name] = tuple(shape)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, shapes)
    return {name: shape for rank_shapes in gathered for name, shape in rank_shapes.items()}
