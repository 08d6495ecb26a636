"""Gradient reduction and the global gradient norm on the CPU, where megatron-core's DDP and
optimizers cannot run (they need CUDA).

After the schedule's backward, :func:`finalize_cpu_grads` does what megatron-core's DDP and
``finalize_model_grads`` do on GPU:

- dense parameters: sum over the data-parallel group (with CP), times 1 / DP;
- routed-expert parameters (``allreduce == False``): sum over the expert-data-parallel group,
  times 1 / DP (their gradient already holds every EP rank's tokens);
- parameters marked ``sequence_parallel`` (norms, the router): sum over TP, whose ranks each
  saw a shard of the sequence.

One flattened all-reduce per group. :func:`global_grad_norm` counts every parameter element of
the one-process model once, whatever the layout.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _is_expert(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def _all_reduce(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def finalize_cpu_grads(model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
    """megatron-core's ``finalize_model_grads_func`` interface, for CPU runs (plain ``.grad``)."""
    if num_tokens is not None:
        raise NotImplementedError("per-token loss scaling (calculate_per_token_loss) is not supported on the CPU")
    params = [p for chunk in model_chunks for p in chunk.parameters() if p.grad is not None]
    config = model_chunks[0].config
    if config.sequence_parallel:
        _all_reduce(
            [p.grad for p in params if getattr(p, "sequence_parallel", False)],
            parallel_state.get_tensor_model_parallel_group(),
        )
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    scale = 1.0 / dist.get_world_size(dp_group)
    _all_reduce([p.grad for p in params if not _is_expert(p)], dp_group, scale)
    _all_reduce([p.grad for p in params if _is_expert(p)], parallel_state.get_expert_data_parallel_group(), scale)


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of the whole model over all ranks, each element counted once.

    A rank's share of a parameter's squared norm is divided by the number of ranks holding the
    same values: data-parallel replicas (expert-data-parallel ones for experts), and the TP
    ranks when the parameter is not TP-split.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dense_replicas = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    expert_replicas = parallel_state.get_expert_data_parallel_world_size()
    total = torch.zeros((), dtype=torch.float64)
    for param in params:
        if param.grad is None:
            continue
        if _is_expert(param):
            replicas = expert_replicas
        else:
            split = getattr(param, "tensor_model_parallel", False)
            replicas = dense_replicas * (1 if split else tp_size)
        total += param.grad.detach().double().square().sum() / replicas
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total.sqrt()
