"""Checkpoints that are either complete or invisible, and verified when loaded.

Layout under ``<output_dir>/checkpoints/``::

    step_00000200/state.pt        model, optimizer, LR scheduler, step, RNG states
    step_00000200/run_config.json the run the checkpoint was trained with
    step_00000200/tokenizer.model the tokenizer it was trained with
    step_00000200/manifest.json   size and SHA-256 of every file, written last
    latest                        the name of the newest complete checkpoint

A checkpoint is written into ``.tmp-step_…``, flushed, and published by renaming the folder; the
``latest`` pointer is then replaced atomically. A save killed half-way leaves only a ``.tmp-``
folder, which resuming reports and ignores. Loading checks every file against the manifest, so a
truncated or tampered file is rejected by name.

The data position needs no state: sample ``i`` of a run is a pure function of ``i`` and the
step, and pools are hashed from the step, so restoring the step resumes at the exact sample.

Any layout saves and loads: ``state.pt`` holds the one-process form of the weights and, on the
CPU, of the AdamW moments (:mod:`megatron_emo.training.full_state`); rank 0 gathers and writes,
every rank loads its slice. GPU checkpoints hold megatron-core's optimizer state and are written
by single-GPU runs (multi-GPU runs need megatron-core's sharded checkpoints, not written yet).
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_emo.parallel.shards import chunks_of, load_full_weights
from megatron_emo.training.full_state import (
    full_optimizer_state,
    full_parameter_shapes,
    full_weights,
    load_full_optimizer_state,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"
TOKENIZER_FILE = "tokenizer.model"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as it is; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def write_checkpoint(final: Path, state: dict, run, tokenizer_file: Optional[Path] = None) -> Path:
    """Write ``state`` (with the run config, tokenizer and manifest) as the folder ``final``,
    atomically: into a temporary folder, flushed, then renamed."""
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _write_json(tmp / "run_config.json", dataclasses.asdict(run))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    files = sorted(p.name for p in tmp.iterdir())
    _write_json(tmp / MANIFEST, {name: {"bytes": (tmp / name).stat().st_size,
                                        "sha256": _sha256(tmp / name)} for name in files})
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _is_cpu_optimizer(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer)


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, run,
                    tokenizer_file: Optional[Path] = None) -> Path:
    """Write checkpoint ``step`` under ``root`` and point ``latest`` at it. Every rank takes
    part (rank 0 gathers the one-process state and writes; the others wait for it)."""
    final = root / checkpoint_name(step)
    weights = full_weights(model)
    # On GPU (one rank) megatron-core's optimizer state, fp32 main weights included.
    optimizer_state = full_optimizer_state(model, optimizer) if _is_cpu_optimizer(optimizer) else optimizer.state_dict()
    if dist.get_rank() == 0:
        state = {
            "step": step,
            "model": weights,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        }
        write_checkpoint(final, state, run, tokenizer_file)
        pointer = root / f"{TMP_PREFIX}{LATEST}"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
    dist.barrier()
    return final


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file matches the manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {manifest_path} is missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: {manifest_path} is not valid JSON ({error})") from error
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {file} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {file} has {size} bytes, the manifest says {expected['bytes']} "
                "(truncated or replaced)"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {file} does not match its SHA-256 (corrupted or modified)")


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None; reports unfinished saves it ignores."""
    if not root.is_dir():
        return None
    for unfinished in sorted(root.glob(f"{TMP_PREFIX}step_*")):
        logger.warning("ignoring %s: an interrupted save", unfinished)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path}, which does not exist")
    return path


def _check_fits(model, saved_state: dict, path: Path) -> None:
    """Raise CheckpointError unless the saved one-process weights fit the model's parameters."""
    expected = full_parameter_shapes(model)
    # Only tensors count: older checkpoints hold megatron-core's ``_extra_state`` entries (None).
    saved_state = {name: value for name, value in saved_state.items() if isinstance(value, torch.Tensor)}
    missing = sorted(set(expected) - set(saved_state))
    unexpected = sorted(set(saved_state) - set(expected))
    mismatched = [
        f"{name}: checkpoint {tuple(saved_state[name].shape)} vs model {shape}"
        for name, shape in expected.items()
        if name in saved_state and tuple(saved_state[name].shape) != shape
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            part for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                "shapes differ: " + ", ".join(mismatched[:5]) if mismatched else "",
            ) if part
        )
        raise CheckpointError(f"checkpoint {path} does not fit this model: {details}")


def load_weights(path: Path, model) -> dict:
    """Verify ``path`` and load its model weights into ``model`` (this rank's slices of them,
    whatever layout saved them); return the whole state."""
    verify_checkpoint(path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    _check_fits(model, state["model"], path)
    load_full_weights(model, chunks_of(model)[0].config, state["model"])
    return state


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> int:
    """Verify ``path``, restore everything, and return the step to continue from."""
    state = load_weights(path, model)
    if "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path} holds weights only: start from it with train.init_from")
    saved_on_cpu = "exp_avg" in state["optimizer"]
    if saved_on_cpu != _is_cpu_optimizer(optimizer):
        raise CheckpointError(
            f"checkpoint {path} holds the optimizer state of a {'CPU' if saved_on_cpu else 'GPU'} run, "
            f"which a {'CPU' if _is_cpu_optimizer(optimizer) else 'GPU'} run cannot resume: start "
            "from its weights with train.init_from instead"
        )
    if saved_on_cpu:
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"]


def prune_checkpoints(root: Path, *, keep_last: int, keep_every: int) -> None:
    """Delete old checkpoints but the newest ``keep_last`` and every ``keep_every``-th step."""
    if dist.get_rank() != 0:
        return
    published = sorted(root.glob("step_*"))
    for path in published[: max(len(published) - keep_last, 0)]:
        step = int(path.name.split("_")[1])
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path)
