"""Expert subsets of an exported model: router statistics, selection, and pruned Qwen2-MoE folders.

EMO's point is that a model trained with document pools can be cut down to a few experts for a
domain. Given calibration text, each layer keeps ``K`` routed experts (plus the shared one):

- ``usage`` (EMO's default, layerwise greedy): for layer l = 0, 1, ... in order, with the layers
  before l already restricted to their kept experts, keep the K experts with the largest mean
  router probability over the calibration tokens;
- ``hits`` (ours): the same greedy order, but keep the K experts that are most often among a
  token's top-k, i.e. the experts the restricted model would actually run;
- ``random``: a seeded random K per layer (the baseline).

A pruned folder has the router rows and expert tensors physically removed (experts renumbered in
ascending original order), ``num_experts = K``, ``num_experts_per_tok = min(top-k, K)``, and a
``pruning_metadata.json`` with the kept experts per layer, the method and the calibration data.
Routing in the pruned model is the full model's routing restricted to the kept experts (softmax
over the kept logits), which :func:`restricted_routing` reproduces on the full model.
"""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_emo.analysis.usage import document_rows
from megatron_emo.convert import hf_folder
from megatron_emo.convert.qwen2_moe import ConversionError

METHODS = ("usage", "hits", "random")
METADATA = "pruning_metadata.json"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")

logger = logging.getLogger(__name__)


def _gates(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers]


@contextlib.contextmanager
def restricted_routing(model, kept: dict[int, list[int]]):
    """Route layer l of a stock ``Qwen2MoeForCausalLM`` over ``kept[l]`` only (others -inf)."""
    saved = {}
    for layer, experts in kept.items():
        gate = _gates(model)[layer]
        mask = torch.full((gate.weight.shape[0],), float("-inf"))
        mask[list(experts)] = 0.0

        def forward(hidden_states, gate=gate, mask=mask):
            hidden_states = hidden_states.reshape(-1, gate.hidden_dim)
            logits = F.linear(hidden_states, gate.weight) + mask.to(hidden_states)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top_value, top_index = torch.topk(probs, gate.top_k, dim=-1)
            return logits, top_value.to(logits.dtype), top_index

        saved[layer] = gate.forward
        gate.forward = forward
    try:
        yield
    finally:
        for layer, forward in saved.items():
            _gates(model)[layer].forward = forward


@torch.no_grad()
def layer_statistics(model, batches: Iterable[torch.Tensor], layer: int, kept: dict[int, list[int]]):
    """Mean router probability and top-k hit count per expert of ``layer`` over the batches,
    with the layers in ``kept`` restricted. Returns ``(mean_probs [E], hits [E], tokens)``."""
    mean, hits, tokens = None, None, 0
    with restricted_routing(model, kept):
        for input_ids in batches:
            logits = model(input_ids=input_ids, output_router_logits=True).router_logits[layer].float()
            probs = torch.softmax(logits, dim=-1)
            top = torch.topk(probs, model.config.num_experts_per_tok, dim=-1).indices
            counts = torch.zeros(probs.shape[-1]).index_add_(0, top.flatten(), torch.ones(top.numel()))
            mean = probs.sum(0) if mean is None else mean + probs.sum(0)
            hits = counts if hits is None else hits + counts
            tokens += probs.shape[0]
    return mean / max(tokens, 1), hits, tokens


def select_experts(model, batches: list[torch.Tensor], keep: int, method: str, seed: int = 0, *,
                   progress: bool = False) -> list[list[int]]:
    """The kept routed experts of every layer (ascending), by ``method`` (see the module docs).
    ``usage`` and ``hits`` log a line per layer, and with ``progress`` show a bar over the rows."""
    num_experts, topk = model.config.num_experts, model.config.num_experts_per_tok
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown: use one of {METHODS}")
    if not topk <= keep <= num_experts:
        raise ValueError(
            f"keeping {keep} routed experts: it must be at least the routed top-k ({topk}) and at most "
            f"the {num_experts} routed experts"
        )
    num_layers = model.config.num_hidden_layers
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return [sorted(torch.randperm(num_experts, generator=generator)[:keep].tolist()) for _ in range(num_layers)]
    kept: dict[int, list[int]] = {}
    for layer in range(num_layers):
        logger.info("selecting the experts of layer %d of %d over %d rows", layer, num_layers, len(batches))
        rows = tqdm(batches, desc=f"layer {layer}", unit="row", leave=False, disable=not progress)
        mean, hits, _ = layer_statistics(model, rows, layer, kept)
        # Ties to the lower expert index (stable), as the router's pool choice.
        score = hits if method == "hits" else mean
        order = torch.sort(score, descending=True, stable=True).indices
        kept[layer] = sorted(order[:keep].tolist())
    return [kept[layer] for layer in range(num_layers)]


def prune_state_dict(tensors: dict, kept: list[list[int]]) -> dict:
    """Keep the selected router rows and experts of each layer, renumbered 0..K-1."""
    out = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if not name.startswith("model.layers.") or parts[3] != "mlp":
            out[name] = tensor
            continue
        layer = int(parts[2])
        if parts[4] == "gate":
            out[name] = tensor[kept[layer]].contiguous()
        elif parts[4] == "experts":
            expert = int(parts[5])
            if expert in kept[layer]:
                parts[5] = str(kept[layer].index(expert))
                out[".".join(parts)] = tensor
        else:
            out[name] = tensor
    return out


def write_pruned(hf_dir: os.PathLike, output: os.PathLike, kept: list[list[int]], *, method: str,
                 calibration: dict, max_shard_size="5GB") -> None:
    """Write the pruned copy of the folder ``hf_dir`` to ``output`` (replaced if present)."""
    hf_dir, output = Path(hf_dir), Path(output)
    config = json.loads((hf_dir / "config.json").read_text())
    keep = len(kept[0])
    if any(len(layer) != keep for layer in kept):
        raise ConversionError("every layer must keep the same number of experts (Qwen2-MoE has one num_experts)")
    tensors = prune_state_dict(hf_folder.read_hf_weights(hf_dir), kept)
    tmp = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_folder.write_hf_tensors(tmp, tensors, max_shard_size=max_shard_size)
        original_experts = config["num_experts"]
        config["num_experts"] = keep
        config["num_experts_per_tok"] = min(config["num_experts_per_tok"], keep)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in ("generation_config.json", *_COPIED):
            if (hf_dir / name).is_file():
                shutil.copy(hf_dir / name, tmp / name)
        metadata = {"method": method, "num_experts_kept": keep, "original_num_experts": original_experts,
                    "experts_kept_per_layer": kept, "shared_expert": "kept", "calibration": calibration,
                    "source": str(hf_dir)}
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def token_batches(tokenizer, texts: Iterable[str], *, seq_length: int, max_tokens: Optional[int]) -> list[torch.Tensor]:
    """Calibration or evaluation text as ``[1, <= seq_length]`` rows, each text cut on its own
    (no row crosses a document: the HF model attends across EOS, ours does not)."""
    rows, total = [], 0
    for text in texts:
        for row in document_rows(tokenizer(text, add_special_tokens=False)["input_ids"], seq_length):
            rows.append(row)
            total += row.shape[1]
            if max_tokens is not None and total >= max_tokens:
                return rows
    return rows


@torch.no_grad()
def perplexity(model, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
    """Token-weighted perplexity of a causal LM over the rows, and the number of predicted tokens."""
    total, count = 0.0, 0
    for input_ids in batches:
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        total += F.cross_entropy(logits, input_ids[0, 1:], reduction="sum").item()
        count += input_ids.shape[1] - 1
    return float(torch.exp(torch.tensor(total / max(count, 1)))), count
