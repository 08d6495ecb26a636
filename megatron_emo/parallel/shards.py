"""Parameter shards of a parallel layout and the one-process ("full") tensors they come from.

A rank's parameter is a slice of the full model's tensor of the same role:

- tensor-parallel linear layers and the vocabulary: megatron-core's ``partition_dim`` over TP;
  a SwiGLU ``linear_fc1`` holds ``[gate | up]`` and splits each half, so a rank holds
  ``[gate_r | up_r]`` (what megatron-core's MLP computes with);
- routed experts: ``fc1 [E, h, 2F]`` and ``fc2 [E, F, h]`` split over EP on dim 0 (padding
  experts beyond E are dropped when joining and zero when slicing) and over ETP on the F dim
  (``fc1`` as SwiGLU halves);
- pipeline stages: local layer ``i`` is global layer ``layer_number - 1``;
- everything else (norms, the router) is replicated.

:func:`full_tensors` joins any per-parameter tensors (weights, gradients, optimizer moments)
into the one-process state on rank 0; :func:`local_tensors` slices one-process tensors for
this rank. Together they reshard: save from any layout, load into any other.
"""

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_emo.parallel.layout import ExpertLayout

ROUTED_FC1, ROUTED_FC2 = "experts.fc1", "experts.fc2"
TIED_INPUT, TIED_OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


@dataclass(frozen=True)
class ShardSpec:
    """How one local parameter sits in its full tensor."""

    full_name: str
    tp_dim: Optional[int] = None
    """Dim split over the tensor-parallel (or expert-tensor-parallel) group; None: not split."""
    glu: bool = False
    """The TP dim holds [gate | up] halves, each split separately."""
    expert: bool = False
    """Routed-expert weight: dim 0 split over EP, replicated over expert-data-parallel ranks."""
    duplicate: bool = False
    """A copy of a parameter another pipeline stage holds (the tied output layer of the last
    stage): never the parameter's main replica."""


def _split_glu(tensor: torch.Tensor, dim: int, glu: bool) -> list[torch.Tensor]:
    return list(tensor.chunk(2, dim=dim)) if glu else [tensor]


def tp_slice(full: torch.Tensor, dim: int, rank: int, size: int, glu: bool = False) -> torch.Tensor:
    """This TP rank's part of ``full`` along ``dim`` (SwiGLU-aware)."""
    return torch.cat([part.chunk(size, dim=dim)[rank] for part in _split_glu(full, dim, glu)], dim=dim)


def tp_join(pieces: list[torch.Tensor], dim: int, glu: bool = False) -> torch.Tensor:
    """Inverse of :func:`tp_slice`: ``pieces`` in TP rank order."""
    halves = zip(*(_split_glu(piece, dim, glu) for piece in pieces))
    return torch.cat([torch.cat(list(half), dim=dim) for half in halves], dim=dim)


def init_routed_experts(fc1: torch.Tensor, fc2: torch.Tensor, config, layout: ExpertLayout) -> None:
    """Initialise this rank's routed experts the same way whatever the layout.

    Each expert draws from its own generator seeded by one number drawn from the default RNG
    plus its global index, full width, then keeps this rank's ETP slice: EP ranks get different
    experts and any EP/ETP layout the same weights as one process. Padding experts are zero.
    """
    base = int(torch.randint(2**62, (1,)))
    etp_rank, etp_size = _expert_tp_coordinates()
    hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
    with torch.no_grad():
        fc1.zero_()
        fc2.zero_()
        for local in range(layout.num_local):
            expert = layout.first_local + local
            if expert >= layout.num_experts:
                break
            generator = torch.Generator().manual_seed(base + expert)
            full_fc1 = torch.empty(hidden, 2 * ffn)
            full_fc2 = torch.empty(ffn, hidden)
            config.init_method(full_fc1, generator=generator)
            config.output_layer_init_method(full_fc2, generator=generator)
            fc1[local].copy_(tp_slice(full_fc1, 1, etp_rank, etp_size, glu=True))
            fc2[local].copy_(tp_slice(full_fc2, 0, etp_rank, etp_size))


def _expert_tp_coordinates() -> tuple[int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return (
        parallel_state.get_expert_tensor_parallel_rank(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )


def chunks_of(model) -> list[torch.nn.Module]:
    """A rank's model as a list of its pipeline chunks (one, or one per virtual stage)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _strip_wrappers(name: str) -> str:
    return re.sub(r"^(module\.)+", "", name)


def _layer_prefixes(chunk: torch.nn.Module) -> dict[str, str]:
    """Local ``decoder.layers.i.`` prefix → global ``decoder.layers.(layer_number - 1).``."""
    prefixes = {}
    for name, module in chunk.named_modules():
        if isinstance(module, TransformerLayer):
            local = _strip_wrappers(name) + "."
            prefixes[local] = re.sub(r"\.\d+\.$", f".{module.layer_number - 1}.", local)
    return prefixes


def parameter_shards(model, config) -> list[tuple[torch.nn.Parameter, ShardSpec]]:
    """Every parameter of this rank (all pipeline chunks of ``model``, a module or a list of
    them, wrappers' ``module.`` prefixes ignored) with its :class:`ShardSpec`."""
    shards = []
    for chunk in chunks_of(model):
        prefixes = _layer_prefixes(chunk)
        for name, param in chunk.named_parameters():
            local = _strip_wrappers(name)
            full_name = local
            for prefix, global_prefix in prefixes.items():
                if local.startswith(prefix):
                    full_name = global_prefix + local[len(prefix):]
                    break
            if local.endswith(ROUTED_FC1):
                spec = ShardSpec(full_name, tp_dim=2, glu=True, expert=True)
            elif local.endswith(ROUTED_FC2):
                spec = ShardSpec(full_name, tp_dim=1, expert=True)
            elif local == TIED_OUTPUT and getattr(param, "shared_embedding", False):
                # One process has no output weight when tied: this copy is the embedding's.
                spec = ShardSpec(TIED_INPUT, tp_dim=param.partition_dim, duplicate=True)
            elif getattr(param, "tensor_model_parallel", False):
                glu = config.gated_linear_unit and local.endswith("linear_fc1.weight")
                spec = ShardSpec(full_name, tp_dim=param.partition_dim, glu=glu)
            else:
                spec = ShardSpec(full_name)
            shards.append((param, spec))
    return shards


def _coordinates() -> dict[str, int]:
    """This rank's place in the grid: TP and EP rank, and whether it holds the first replica
    of dense and of expert parameters (data-parallel rank 0 / expert-data-parallel rank 0)."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "ep": parallel_state.get_expert_model_parallel_rank(),
        "dense_replica": parallel_state.get_data_parallel_rank(with_context_parallel=True),
        "expert_replica": parallel_state.get_expert_data_parallel_rank(),
    }


def full_tensors(
    model, config, tensor_of: Callable[[torch.nn.Parameter], Optional[torch.Tensor]]
) -> Optional[dict[str, torch.Tensor]]:
    """Join ``tensor_of(param)`` of every rank into one-process tensors on rank 0.

    Args:
        model: this rank's model (a module or its list of pipeline chunks).
        config: its EmoConfig.
        tensor_of: the tensor to join for a parameter (the parameter itself, its ``.grad``,
            an optimizer moment...); None leaves the parameter out.

    Returns:
        On rank 0 ``{full name: tensor}`` (CPU, float dtype of the pieces); None elsewhere.
        Every rank must call it (it gathers over the whole world).
    """
    coords = _coordinates()
    pieces = []
    for param, spec in parameter_shards(model, config):
        first_replica = coords["expert_replica" if spec.expert else "dense_replica"] == 0 and not spec.duplicate
        tensor = tensor_of(param)
        if first_replica and tensor is not None:
            pieces.append((spec, tensor.detach().cpu()))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((coords, pieces), gathered, dst=0)
    if gathered is None:
        return None
    return _join(gathered, config)


def _join(gathered: list, config) -> dict[str, torch.Tensor]:
    by_name: dict[str, dict] = {}
    for coords, pieces in gathered:
        for spec, tensor in pieces:
            entry = by_name.setdefault(spec.full_name, {"spec": spec, "parts": {}})
            entry["parts"][(coords["ep"] if spec.expert else 0, coords["tp"] if spec.tp_dim is not None else 0)] = tensor
    full = {}
    for name, entry in by_name.items():
        spec, parts = entry["spec"], entry["parts"]
        ep_ranks = sorted({ep for ep, _ in parts})
        tp_ranks = sorted({tp for _, tp in parts})
        rows = []
        for ep in ep_ranks:
            row = [parts[(ep, tp)] for tp in tp_ranks]
            rows.append(tp_join(row, spec.tp_dim, spec.glu) if spec.tp_dim is not None else row[0])
        tensor = torch.cat(rows) if spec.expert else rows[0]
        full[name] = tensor[: config.num_routed_experts] if spec.expert else tensor
    return full


def local_tensors(model, config, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's slices of one-process tensors: ``{full name: tensor}`` for every parameter
    of this rank whose full name is in ``full`` (padding experts zero)."""
    coords = _coordinates()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    layout = ExpertLayout(config.num_routed_experts, ep_size, coords["ep"])
    result = {}
    for _, spec in parameter_shards(model, config):
        if spec.full_name not in full:
            continue
        tensor = full[spec.full_name]
        if spec.expert:
            padding = layout.num_padded - tensor.shape[0]
            if padding:
                tensor = torch.cat([tensor, tensor.new_zeros(padding, *tensor.shape[1:])])
            tensor = tensor[layout.first_local : layout.first_local + layout.num_local]
        if spec.tp_dim is not None:
            tensor = tp_slice(tensor, spec.tp_dim, coords["tp"], tp_size, spec.glu)
        result[spec.full_name] = tensor
    return result


def load_full_weights(model, config, full: dict[str, torch.Tensor]) -> None:
    """Copy one-process weights into this rank's parameters (every parameter must be there)."""
    values = local_tensors(model, config, full)
    shards = parameter_shards(model, config)
    missing = sorted(spec.full_name for _, spec in shards if spec.full_name not in values)
    if missing:
        raise KeyError(f"the weights lack {len(missing)} parameter(s) of this model, e.g. {missing[:3]}")
    with torch.no_grad():
        for param, spec in shards:
            value = values[spec.full_name]
            if param.shape != value.shape:
                raise ValueError(f"{spec.full_name}: this rank's shard is {tuple(param.shape)}, "
                                 f"the weights give {tuple(value.shape)}")
            param.copy_(value)
