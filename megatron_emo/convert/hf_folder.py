"""Hugging Face folders of a Qwen2-MoE export: sharded safetensors with an index, config.json and
generation_config.json, written one shard at a time; and reading them back with clear errors.

Shards are written by this module rather than ``save_pretrained``: transformers' in-memory
expert layout differs between 4.x and 5.x, while the per-expert on-disk names load in both.
"""

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_emo.config import EmoConfig
from megatron_emo.convert.qwen2_moe import (
    ConversionError,
    Dims,
    GPTSettings,
    hf_shapes,
    iter_hf_tensors,
    tensors_of,
    to_hf_config,
)


def generation_config(hf_config, *, tokenizer_vocab_size: Optional[int] = None):
    """Greedy by default; padded vocabulary rows (ids >= the tokenizer's size) suppressed."""
    from transformers import GenerationConfig

    kwargs = dict(
        bos_token_id=hf_config.bos_token_id,
        eos_token_id=hf_config.eos_token_id,
        pad_token_id=hf_config.pad_token_id,
        do_sample=False,
    )
    if tokenizer_vocab_size is not None and tokenizer_vocab_size < hf_config.vocab_size:
        kwargs["suppress_tokens"] = list(range(tokenizer_vocab_size, hf_config.vocab_size))
    return GenerationConfig(**kwargs)


def _plan_shards(shapes: dict, bytes_per_element: int, max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * bytes_per_element
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def parse_size(size) -> int:
    """``"5GB"`` / ``"500MB"`` / an int → bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_hf_weights(
    output_dir: os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    shapes: dict,
    dtype: torch.dtype,
    *,
    max_shard_size="5GB",
) -> list[str]:
    """Write ``model-0000i-of-0000n.safetensors`` (+ ``model.safetensors.index.json`` when sharded).

    ``tensors`` must come in ``shapes`` order; shards are planned from the shapes first, so
    only one shard is in memory at a time. The file names and index are transformers' own.
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    element = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, element, parse_size(max_shard_size))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    stream = iter(tensors)
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        batch = {}
        for expected in shard:
            name, tensor = next(stream)
            if name != expected or tuple(tensor.shape) != tuple(shapes[expected]):
                raise ConversionError(
                    f"internal: got {name} {tuple(tensor.shape)}, expected {expected} {shapes[expected]}"
                )
            batch[name] = tensor
            weight_map[name] = file_name
            total += tensor.numel() * element
        save_file(batch, str(output_dir / file_name), metadata={"format": "pt"})
        os.chmod(output_dir / file_name, 0o666 & ~_umask())  # safetensors writes 0600
    if next(stream, None) is not None:
        raise ConversionError("internal: more tensors than planned")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _natural_key(name: str) -> tuple:
    """Numbers compare as numbers: ``experts.10`` after ``experts.9``."""
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def write_hf_tensors(output_dir: os.PathLike, tensors: dict[str, torch.Tensor], *, max_shard_size="5GB") -> list[str]:
    """:func:`write_hf_weights` of an in-memory dict (one dtype), in natural name order."""
    ordered = {name: tensors[name] for name in sorted(tensors, key=_natural_key)}
    shapes = {name: tuple(tensor.shape) for name, tensor in ordered.items()}
    dtype = next(iter(ordered.values())).dtype
    return write_hf_weights(output_dir, ordered.items(), shapes, dtype, max_shard_size=max_shard_size)


def save_hf_model(
    output_dir: os.PathLike,
    state_dict: dict,
    config: EmoConfig,
    gpt: GPTSettings,
    *,
    dtype: Optional[torch.dtype] = None,
    bos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    tokenizer_vocab_size: Optional[int] = None,
    max_shard_size="5GB",
) -> None:
    """Write ``config.json``, ``generation_config.json`` and the safetensors into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or tensors_of(state_dict)["embedding.word_embeddings.weight"].dtype
    hf_config = to_hf_config(config, gpt, bos_token_id=bos_token_id, pad_token_id=pad_token_id, dtype=dtype)
    shapes = hf_shapes(Dims.of(config, gpt))
    write_hf_weights(output_dir, iter_hf_tensors(state_dict, config, gpt, dtype=dtype), shapes, dtype,
                     max_shard_size=max_shard_size)
    hf_config.save_pretrained(output_dir)
    generation_config(hf_config, tokenizer_vocab_size=tokenizer_vocab_size).save_pretrained(output_dir)


def check_hf_folder(hf_dir: os.PathLike) -> Path:
    """``hf_dir`` as a Path if it is a folder with a config.json, else FileNotFoundError. Checked
    before transformers sees the name: it takes any other name for a Hub repo id (and, offline,
    retries the Hub for half a minute), and this project loads local exports only."""
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise FileNotFoundError(f"Hugging Face folder {hf_dir} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face folder (no config.json): export one with "
                                "tools/convert_to_hf.py")
    return hf_dir


def read_hf_weights(hf_dir: os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder (single file or sharded with an index); clear errors for a
    missing shard or a tensor the index names but no shard holds."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    index_path = hf_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (hf_dir / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for file_name in files:
        path = hf_dir / file_name
        if not path.is_file():
            raise ConversionError(f"{hf_dir}: shard {file_name} named in the index is missing")
        tensors.update(load_file(str(path)))
    if weight_map is not None:
        absent = [name for name in weight_map if name not in tensors]
        if absent:
            raise ConversionError(f"{hf_dir}: {len(absent)} tensors of the index are in no shard (e.g. {absent[:3]})")
    return tensors
