"""megatron-core sharded state dicts in one-process terms: what a checkpoint holds.

Every tensor of a rank (a parameter, or an optimizer moment shaped like one) is described to
megatron-core's ``dist_checkpointing`` as the piece(s) of its one-process tensor it holds (see
:mod:`megatron_emo.parallel.shards`):

- the key is the one-process name (``decoder.layers.<global layer>.…``), so keys do not depend
  on the pipeline split and match the Hugging Face converter's names;
- the global shape is the one-process shape: routed experts count the real experts only, so a
  rank's padding experts are not stored (and load as zeros), and a SwiGLU ``fc1`` is stored as
  ``[gate | up]`` — each rank's two halves are two pieces at their own offsets;
- one replica stores each piece: TP rank 0 for what TP does not split, data-parallel rank 0
  (expert-data-parallel rank 0 for routed experts), never a pipeline stage's copy of a tied
  embedding.

Any layout that builds the same model therefore loads any other layout's checkpoint: each rank
asks for its pieces and ``torch.distributed.checkpoint`` reads the overlapping stored ones.
:func:`full_tensors` and :func:`local_tensors` join and slice whole one-process tensors with
the same pieces (to compare layouts with one process).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_emo.parallel.layout import ExpertLayout, expert_layout
from megatron_emo.parallel.shards import ShardSpec, parameter_shards


@dataclass(frozen=True)
class _Placement:
    """Where a rank's local tensor sits in the one-process tensor."""

    spec: ShardSpec
    tp_rank: int
    tp_size: int
    layout: Optional[ExpertLayout]  # routed experts only
    replica_id: tuple

    def real_rows(self) -> int:
        """Local routed experts that exist in one process (the rest are padding)."""
        return max(0, min(self.layout.num_local, self.layout.num_experts - self.layout.first_local))

    def pieces(self, key: str, local: torch.Tensor, replica_id) -> list[ShardedTensor]:
        """``local`` (this rank's tensor) as ShardedTensors of the one-process tensor ``key``."""
        spec = self.spec
        offset = [0] * local.ndim
        global_shape = list(local.shape)
        if spec.expert:
            if self.real_rows() == 0:
                return []  # only padding experts here
            if self.real_rows() < local.shape[0]:
                local = local[: self.real_rows()]
            offset[0] = self.layout.first_local
            global_shape[0] = self.layout.num_experts
        if spec.tp_dim is None:
            return [_piece(key, local, global_shape, offset, replica_id)]
        dim = spec.tp_dim
        halves = local.chunk(2, dim=dim) if spec.glu else (local,)
        width = halves[0].shape[dim]
        global_shape[dim] = width * self.tp_size * len(halves)
        pieces = []
        for index, half in enumerate(halves):
            offset[dim] = (index * self.tp_size + self.tp_rank) * width
            pieces.append(_piece(key, half, global_shape, offset, replica_id))
        return pieces

    def merge(self, pieces: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pieces`: the loaded pieces as a tensor like this rank's ``like``
        (padding experts zero)."""
        if not pieces:
            return torch.zeros_like(like)
        tensor = torch.cat(pieces, dim=self.spec.tp_dim) if len(pieces) > 1 else pieces[0]
        missing = like.shape[0] - tensor.shape[0] if self.spec.expert else 0
        if missing:
            tensor = torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])])
        return tensor


def _piece(key, data, global_shape, offset, replica_id) -> ShardedTensor:
    # No regular grid (axis_fragmentations=None): padding makes expert pieces uneven, and
    # torch.distributed.checkpoint handles any rectangular pieces.
    return ShardedTensor(key, data, data.dtype, tuple(data.shape), tuple(global_shape), tuple(offset),
                         None, replica_id)


def _placements(model, config) -> list[tuple[torch.nn.Parameter, _Placement]]:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    dense_replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    expert_replica = parallel_state.get_expert_data_parallel_rank()
    layout = expert_layout(config)
    placements = []
    for param, spec in parameter_shards(model, config):
        if spec.expert:
            replica = (0, 0, expert_replica)
        else:
            # (TP replica, stage copy, DP replica): the main replica is all zeros.
            replica = (tp_rank if spec.tp_dim is None else 0, int(spec.duplicate), dense_replica)
        placements.append((param, _Placement(spec, tp_rank, tp_size, layout if spec.expert else None, replica)))
    return placements


def _sharded(key: str, tensor: torch.Tensor, placement: _Placement):
    """A ShardedTensor where the local tensor is one plain piece, else a factory that splits it
    into pieces on save and joins them on load (megatron-core's optimizers build the same
    factory for their moments with their own key and data)."""
    spec = placement.spec
    trimmed = spec.expert and placement.real_rows() < tensor.shape[0]
    if not (spec.glu or trimmed):
        return placement.pieces(key, tensor, placement.replica_id)[0]

    def build(key, data, replica_id, flattened_range):
        return placement.pieces(key, data, replica_id)

    def merge(loaded):
        return placement.merge(loaded, tensor)

    return ShardedTensorFactory(key, tensor, build, merge, placement.replica_id)


def sharded_tensors(model, config, prefix: str = "",
                    tensor_of: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda param: param) -> dict:
    """``{prefix + one-process name: ShardedTensor or factory}`` of ``tensor_of(param)`` for every
    parameter of this rank (by default the parameters themselves; any tensor shaped like the
    parameter, e.g. an optimizer moment; None leaves the parameter out). ``model``: a module or
    this rank's list of pipeline chunks."""
    result = {}
    for param, placement in _placements(model, config):
        tensor = tensor_of(param)
        if tensor is not None:
            key = prefix + placement.spec.full_name
            result[key] = _sharded(key, tensor, placement)
    return result


def parameters_by_name(model, config) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by one-process name (a tied output layer under the embedding's)."""
    return {spec.full_name: param for param, spec in parameter_shards(model, config)}


def full_tensors(
    model, config, tensor_of: Callable[[torch.nn.Parameter], Optional[torch.Tensor]]
) -> Optional[dict[str, torch.Tensor]]:
    """Join ``tensor_of(param)`` of every rank (weights, gradients…; None leaves a parameter
    out) into one-process tensors: ``{name: tensor}`` on rank 0, None elsewhere. Every rank
    calls it."""
    pieces = []
    for param, placement in _placements(model, config):
        tensor = tensor_of(param)
        if tensor is None or any(placement.replica_id):
            continue
        for piece in placement.pieces(placement.spec.full_name, tensor.detach().cpu(), placement.replica_id):
            pieces.append((piece.key, piece.global_shape, piece.global_slice(), piece.data))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if gathered is None:
        return None
    full = {}
    for rank_pieces in gathered:
        for key, shape, where, data in rank_pieces:
            full.setdefault(key, data.new_zeros(shape))[where] = data
    return full


def local_tensors(model, config, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slices of one-process tensors, for every parameter whose name is in ``full``
    (padding experts zero)."""
    result = {}
    for param, placement in _placements(model, config):
        name = placement.spec.full_name
        if name in full:
            pieces = placement.pieces(name, param.detach(), placement.replica_id)
            if pieces and tuple(full[name].shape) != pieces[0].global_shape:
                raise ValueError(f"{name}: the weights give {tuple(full[name].shape)}, this model's "
                                 f"one-process shape is {pieces[0].global_shape}")
            result[name] = placement.merge([full[name][piece.global_slice()] for piece in pieces], param)
    return result


def load_full_weights(model, config, full: dict[str, torch.Tensor]) -> None:
    """Copy one-process weights into this rank's parameters (every parameter must be there)."""
    values = local_tensors(model, config, full)
    missing = sorted(set(parameters_by_name(model, config)) - set(values))
    if missing:
        raise KeyError(f"the weights lack {len(missing)} parameter(s) of this model, e.g. {missing[:3]}")
    with torch.no_grad():
        for param, spec in parameter_shards(model, config):
            param.copy_(values[spec.full_name])
