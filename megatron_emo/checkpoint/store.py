"""Checkpoints that are either complete or invisible, verified when loaded, and loadable under
any parallel layout.

Layout under ``<output_dir>/checkpoints/``::

    step_00000200/__0_0.distcp …  every rank's tensors   megatron-core dist_checkpointing
    step_00000200/.metadata      where each piece lies    ("torch_dist": torch.distributed.checkpoint)
    step_00000200/common.pt      step, schedule, optimizer kind, world size
    step_00000200/metadata.json  megatron-core's format marker
    step_00000200/run_config.json the run the checkpoint was trained with
    step_00000200/tokenizer.model the tokenizer it was trained with
    step_00000200/manifest.json   size and SHA-256 of every file, written last
    latest                        the name of the newest complete checkpoint

What the state holds is :mod:`megatron_emo.checkpoint.state`; its tensors are keyed and
shaped as one process holds them (:mod:`megatron_emo.checkpoint.sharded_state`), so a run saved on
EP4 resumes on EP2 or on one GPU, and a CPU run on another layout likewise.

Every rank writes its own pieces into ``.tmp-step_…``; the ranks then hash the files (each a
share), rank 0 writes the manifest, flushes, publishes the folder by renaming it, and replaces
the ``latest`` pointer atomically. A save killed half-way leaves only a ``.tmp-`` folder, which
resuming reports and ignores. On GPU the write may run in the background
(``train.async_save``): the folder is published when every rank's write has finished.
Loading checks every file against the manifest (the ranks share the hashing), so a truncated or
tampered file is rejected by name, and a checkpoint of another model shape is rejected with the
differing tensors and config fields.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_emo.checkpoint.sharded_state import sharded_tensors
from megatron_emo.checkpoint.state import OPTIMIZER_KIND, load_model, restore, training_state
from megatron_emo.config import MODEL_DEFAULTS
from megatron_emo.files import fsync_dir, replace_folder
from megatron_emo.parallel.shards import chunks_of
from megatron_emo.recipes import GPTConfig

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_CONFIG = "run_config.json"
LATEST = "latest"
TOKENIZER_FILE = "tokenizer.model"
TMP_PREFIX = ".tmp-"
OPTIMIZER_PREFIX = "optimizer."
SHARDED_MARKER = "metadata.json"  # megatron-core's format marker


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as it is; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


CHECKPOINT_NAME = re.compile(r"step_(\d+)")


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name).group(1))


def published_checkpoints(root: Path) -> list[Path]:
    """The published checkpoint folders under ``root`` (``step_<digits>``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((path for path in root.iterdir() if path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name)),
                  key=checkpoint_step)


# ---------------------------------------------------------------------------------------------
# Files: hashing, manifest, publication

def _sha256(path: Path, *, flush: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
        if flush:  # on storage before the folder is published
            os.fsync(f.fileno())
    return digest.hexdigest()


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def _share(names: list[str]) -> list[str]:
    """This rank's share of ``names`` (the ranks hash and verify files in parallel)."""
    return names[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else names


def _for_each_file(function, names: list[str]) -> dict:
    """``{name: function(name)}``, several files at a time (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return dict(zip(names, pool.map(function, names)))


def _all_ranks(values: dict) -> dict:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return {key: value for part in gathered for key, value in part.items()}


def _publish(tmp: Path, final: Path, run, tokenizer_file: Optional[Path], *, point_latest: bool = True) -> Path:
    """Add the run config and tokenizer to the written folder ``tmp``, hash every file, write
    the manifest and publish ``tmp`` as ``final`` (with ``latest`` beside it pointing at it, for
    a run's checkpoints). Every rank takes part."""
    if dist.get_rank() == 0:
        _write_json(tmp / RUN_CONFIG, dataclasses.asdict(run))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    dist.barrier()
    names = _files(tmp)
    manifest = _all_ranks(_for_each_file(
        lambda name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name, flush=True)}, _share(names)))
    if dist.get_rank() == 0:
        _write_json(tmp / MANIFEST, {name: manifest[name] for name in names})
        fsync_dir(tmp)
        replace_folder(tmp, final)  # a re-save of a step after a resume, or a re-import, replaces it
        if point_latest:
            point_latest_at(final)
    dist.barrier()
    return final


def point_latest_at(checkpoint: Path) -> None:
    """Replace the ``latest`` pointer beside ``checkpoint`` by one naming it, atomically."""
    pointer = checkpoint.parent / f"{TMP_PREFIX}{LATEST}"
    pointer.write_text(checkpoint.name + "\n")
    os.replace(pointer, checkpoint.parent / LATEST)
    fsync_dir(checkpoint.parent)


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


# ---------------------------------------------------------------------------------------------
# Saving

class CheckpointSaver:
    """Writes a run's checkpoints under ``root`` and applies the retention rules.

    With ``asynchronous`` (GPU only: the state is copied to host memory before training goes
    on) the files are written by background processes and each checkpoint is published by
    :meth:`poll` or :meth:`wait` once every rank has finished writing it.
    """

    def __init__(self, root: Path, *, run, tokenizer_file: Optional[Path] = None, asynchronous: bool = False,
                 on_published: Callable[[Path, float], None] = lambda path, seconds: None):
        if asynchronous and not torch.cuda.is_available():
            raise ValueError("asynchronous checkpoint saving needs a GPU")
        self.root, self.run, self.tokenizer_file = Path(root), run, tokenizer_file
        self.on_published = on_published
        self.queue = AsyncCallsQueue() if asynchronous else None

    def save(self, step: int, *, model, optimizer, scheduler) -> None:
        """Checkpoint ``step`` (every rank calls it); published now, or later when asynchronous."""
        self.wait()  # one save in flight at a time
        started = time.perf_counter()
        final = self.root / checkpoint_name(step)
        tmp = _fresh_tmp(final)
        state = training_state(model, optimizer, scheduler, step, is_loading=False)

        def publish():
            _publish(tmp, final, self.run, self.tokenizer_file)
            prune_checkpoints(self.root, keep_last=self.run.train.keep_last, keep_every=self.run.train.keep_every)
            self.on_published(final, time.perf_counter() - started)

        if self.queue is None:
            dist_checkpointing.save(state, str(tmp))
            publish()
        else:
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(publish)
            self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Publish the background saves every rank has finished (every rank calls it)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Finish and publish every background save."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self) -> None:
        if self.queue is not None:
            self.wait()
            self.queue.close()


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, run,
                    tokenizer_file: Optional[Path] = None) -> Path:
    """Write checkpoint ``step`` under ``root`` now and point ``latest`` at it (every rank)."""
    CheckpointSaver(root, run=run, tokenizer_file=tokenizer_file).save(
        step, model=model, optimizer=optimizer, scheduler=scheduler)
    return Path(root) / checkpoint_name(step)


def write_weights_checkpoint(final: Path, weights: dict[str, torch.Tensor], run,
                             tokenizer_file: Optional[Path] = None) -> Path:
    """Publish one-process ``weights`` (e.g. an imported Hugging Face model) as the weights-only
    checkpoint folder ``final``, which training starts from with ``train.init_from``. Needs a
    process group (one process is enough)."""
    final = Path(final)
    tmp = _fresh_tmp(final)
    state = {"model": {name: ShardedTensor.from_rank_offsets(name, tensor.contiguous(), replica_id=dist.get_rank())
                       for name, tensor in weights.items()},
             "step": 0}
    dist_checkpointing.save(state, str(tmp))
    return _publish(tmp, final, run, tokenizer_file, point_latest=False)


# ---------------------------------------------------------------------------------------------
# Finding and checking

def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file matches the manifest. Inside a process group the
    ranks share the hashing (every rank must call it)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {manifest_path} is missing (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: {manifest_path} is not valid JSON ({error})") from error
    names = sorted(manifest)
    errors = _for_each_file(lambda name: _file_error(path, name, manifest[name]), _share(names))
    if dist.is_initialized():
        errors = _all_ranks(errors)
    for name in names:
        if errors[name]:
            raise CheckpointError(f"checkpoint {path}: {path / name} {errors[name]}")


def _file_error(folder: Path, name: str, expected: dict) -> Optional[str]:
    """What is wrong with one file, or None; never raises (every rank must reach the gather)."""
    file = folder / name
    try:
        if not file.is_file():
            return "is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"has {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
        if _sha256(file) != expected["sha256"]:
            return "does not match its SHA-256 (corrupted or modified)"
    except (OSError, KeyError, TypeError) as error:
        return f"cannot be checked ({type(error).__name__}: {error})"
    return None


def report_unfinished_saves(root: Path) -> None:
    for unfinished in sorted(Path(root).glob(f"{TMP_PREFIX}step_*")):
        logger.warning("ignoring %s: an interrupted save", unfinished)


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None; reports unfinished saves it ignores."""
    root = Path(root)
    if not root.is_dir():
        return None
    report_unfinished_saves(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path}, which does not exist")
    return path


def _tensors_metadata(path: Path) -> dict:
    if not (path / SHARDED_MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} has no {SHARDED_MARKER}: not a megatron-core sharded checkpoint "
                              "(a state.pt checkpoint of an earlier megatron_emo cannot be read)")
    return dist_checkpointing.load_tensors_metadata(str(path))


def saved_model_shapes(path: Path) -> dict[str, tuple]:
    """One-process name → shape of every model tensor in checkpoint ``path``."""
    metadata = _tensors_metadata(path)
    return {key: tuple(tensor.global_shape) for key, tensor in metadata.items()
            if not key.startswith(OPTIMIZER_PREFIX)}


def _expected_shapes(model) -> dict[str, tuple]:
    """One-process name → shape of the model's tensors, over all ranks (every rank calls it)."""
    shapes = {}
    for key, value in sharded_tensors(model, chunks_of(model)[0].config).items():
        pieces = value.build() if isinstance(value, ShardedTensorFactory) else [value]
        for piece in pieces:
            shapes[key] = tuple(piece.global_shape)
    return _all_ranks(shapes)


def _as_saved(value):
    """``value`` as run_config.json holds it (tuples become lists, objects strings)."""
    return json.loads(json.dumps(value, default=str))


def config_differences(path: Path, run, *, ignore=frozenset()) -> list[str]:
    """The ``model.*`` and ``gpt.*`` settings of ``run`` that differ from those checkpoint
    ``path`` was trained with (a field set on one side only counts with its default on the
    other), but those named in ``ignore``."""
    try:
        saved = json.loads((path / RUN_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    current = dataclasses.asdict(run)
    defaults = {"model": MODEL_DEFAULTS, "gpt": dataclasses.asdict(GPTConfig())}
    differences = []
    for section in ("model", "gpt"):
        ours, theirs = current[section], saved.get(section, {})
        for name in sorted((set(ours) | set(theirs)) - set(ignore)):
            old, new = (_as_saved(side.get(name, defaults[section].get(name))) for side in (theirs, ours))
            if old != new:
                differences.append(f"{section}.{name}: checkpoint {old!r} vs run {new!r}")
    return differences


def _check_fits(path: Path, model, run) -> None:
    """Raise CheckpointError unless the checkpoint's model tensors are those of ``model``."""
    saved, expected = saved_model_shapes(path), _expected_shapes(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [f"{name}: checkpoint {saved[name]} vs model {shape}"
                  for name, shape in sorted(expected.items()) if name in saved and saved[name] != shape]
    if not (missing or unexpected or mismatched):
        return
    details = [part for part in (
        f"missing {missing[:5]}" if missing else "",
        f"unexpected {unexpected[:5]}" if unexpected else "",
        "shapes differ: " + ", ".join(mismatched[:5]) if mismatched else "",
    ) if part]
    if run is not None:
        details += config_differences(path, run)[:10]
    raise CheckpointError(f"checkpoint {path} does not fit this model: " + "; ".join(details))


# ---------------------------------------------------------------------------------------------
# Loading

def load_weights(path: Path, model, run=None) -> None:
    """Verify checkpoint ``path`` (any layout, with or without optimizer state) and load its
    weights into this rank's ``model`` (every rank calls it)."""
    path = Path(path)
    verify_checkpoint(path)
    _check_fits(path, model, run)
    load_model(path, model)


def load_checkpoint(path: Path, *, model, optimizer, scheduler, run=None, verified: bool = False) -> int:
    """Verify ``path`` (unless the caller just ``verified`` it), restore everything, and return
    the step to continue from."""
    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    _check_fits(path, model, run)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "optimizer_kind" not in common:
        raise CheckpointError(f"checkpoint {path} holds weights only: start from it with train.init_from")
    if common["optimizer_kind"] != OPTIMIZER_KIND:
        raise CheckpointError(
            f"checkpoint {path} holds {common['optimizer_kind']!r} optimizer state (a CPU run of an earlier "
            f"version), which this version does not resume: start from its weights with train.init_from instead"
        )
    same_world = common["world_size"] == dist.get_world_size()
    if not same_world:
        logger.warning("checkpoint %s was saved by %d ranks, this run has %d: its RNG states are not restored",
                       path, common["world_size"], dist.get_world_size())
    state = training_state(model, optimizer, scheduler, 0, is_loading=True, with_rng=same_world)
    loaded = dist_checkpointing.load(state, str(path))
    restore(loaded, model, optimizer, scheduler)
    return int(loaded["step"])


def read_tensors(path: Path, *, optimizer: bool = False) -> dict[str, torch.Tensor]:
    """The one-process weights of checkpoint ``path``, whole, by name (with ``optimizer`` also
    the optimizer's tensors, ``optimizer.state.<kind>.<name>``). No model needed; call it in a
    process group, e.g. of one process."""
    metadata = _tensors_metadata(Path(path))
    wanted = {key: tensor for key, tensor in metadata.items() if optimizer or not key.startswith(OPTIMIZER_PREFIX)}
    loaded = dist_checkpointing.load(wanted, str(path))
    return {key: loaded[key] for key in wanted}  # without the common state load adds


def prune_checkpoints(root: Path, *, keep_last: int, keep_every: int) -> None:
    """Delete old checkpoints but the newest ``keep_last`` and every ``keep_every``-th step."""
    if dist.get_rank() != 0:
        return
    published = published_checkpoints(root)
    for path in published[: max(len(published) - keep_last, 0)]:
        if keep_every and checkpoint_step(path) % keep_every == 0:
            continue
        shutil.rmtree(path)
