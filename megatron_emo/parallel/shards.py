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

:mod:`megatron_emo.checkpoint.sharded_state` turns this into the pieces of one-process tensors
that checkpoints store, and joins or slices whole tensors the same way.
"""

import re
from dataclasses import dataclass
from typing import Optional

import torch
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
