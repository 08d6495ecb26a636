"""Where a run starts, decided before anything in its output folder is written.

    the folder holds                      train.resume=True              train.resume=False
    nothing of a run                      step 0 (init_from's weights)   step 0 (init_from's weights)
    checkpoints                           the newest one that verifies   refused
    metrics but no checkpoint             refused                        refused
    checkpoints of another init_from      refused                        refused
    checkpoints of other model settings   refused                        refused

The newest checkpoint is the one ``latest`` names. When that pointer is missing, or its
checkpoint does not verify (truncated, tampered), the newest other checkpoint that verifies is
taken and the warning names both; when none verifies the error lists each one's fault.
Other model settings are any ``model.*`` or ``gpt.*`` field but the parallel layout and
recomputation (:data:`LAYOUT_FIELDS`). Checkpoints newer than the one resumed are renamed
``.stale-step_N``, so they are neither resumed later nor counted by the retention rules. A
refusal names the way out: another ``train.output_dir``, or deleting the folder. So a run is
never restarted over, mixed with or truncated into another run's files. Rank 0 reads the
folder; every rank follows its decision.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_emo.checkpoint.store import (
    LATEST,
    RUN_CONFIG,
    CheckpointError,
    checkpoint_step,
    config_differences,
    point_latest_at,
    published_checkpoints,
    report_unfinished_saves,
    verify_checkpoint,
)
from megatron_emo.config import ConfigError
from megatron_emo.parallel.layout import PARALLEL_FIELDS

logger = logging.getLogger(__name__)

METRICS_FILES = ("metrics.jsonl", "eval.jsonl")
STALE_PREFIX = ".stale-"
LAYOUT_FIELDS = frozenset(PARALLEL_FIELDS) | {
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
}
"""Model settings a run may change when it resumes: how it is laid out over GPUs and what it
recomputes, not what it computes (checkpoints load under any layout)."""


@dataclass(frozen=True)
class StartPoint:
    """Resume from ``checkpoint`` (everything: weights, optimizer, step), or else start at step
    0 from the weights of ``init_from`` (None: freshly initialised)."""

    checkpoint: Optional[Path] = None
    init_from: Optional[Path] = None


def _has_records(output_dir: Path) -> bool:
    return any((output_dir / name).is_file() and (output_dir / name).stat().st_size for name in METRICS_FILES)


def _way_out(output_dir: Path) -> str:
    return f"give this run another train.output_dir, or delete {output_dir} to start over"


def _saved_init_from(checkpoint: Path) -> Optional[str]:
    try:
        return json.loads((checkpoint / RUN_CONFIG).read_text())["train"].get("init_from")
    except (OSError, ValueError, KeyError):
        return None


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return (a is None) == (b is None) and (a is None or Path(a).resolve() == Path(b).resolve())


def _newest_verified(root: Path, candidates: list[Path]) -> Path:
    """The first of ``candidates`` that verifies; each one that does not is reported."""
    faults = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            faults.append(str(error))
            logger.warning("%s; trying the next older checkpoint", error)
            continue
        if faults:
            logger.warning("resuming from %s, the newest checkpoint that verifies", path)
        return path
    raise CheckpointError(f"no checkpoint in {root} verifies: " + "; ".join(faults))


def resume_candidates(root: Path, published: list[Path]) -> list[Path]:
    """The ``published`` checkpoints under ``root`` in order of preference: the one ``latest``
    names, then the others newest first. A missing or dangling pointer is reported."""
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is None:
        logger.warning("%s is missing: taking the newest checkpoint that verifies", pointer)
    elif named not in published:
        logger.warning("%s names %s, which is not a published checkpoint: taking the newest one that "
                       "verifies", pointer, named)
        named = None
    others = sorted((path for path in published if path != named), key=checkpoint_step, reverse=True)
    return ([named] if named else []) + others


def _decide(train) -> tuple[str, object]:
    """Rank 0's reading of the folder: ``("refuse", message)``, ``("fresh", init_from)`` or
    ``("resume", candidates)``."""
    output_dir = Path(train.output_dir)
    root = output_dir / "checkpoints"
    report_unfinished_saves(root)
    published = published_checkpoints(root)
    if not published:
        if _has_records(output_dir):
            return "refuse", (f"{output_dir} holds the metrics of an earlier run but no checkpoint to resume it "
                              "from: " + _way_out(output_dir))
        return "fresh", Path(train.init_from) if train.init_from else None
    if not train.resume:
        return "refuse", (f"{output_dir} already holds a run (checkpoints up to step {checkpoint_step(published[-1])}) "
                          f"and train.resume=False: resume it (train.resume=True), or {_way_out(output_dir)}")
    return "resume", resume_candidates(root, published)


def _set_aside_newer(checkpoint: Path) -> None:
    """Rename the published checkpoints newer than ``checkpoint`` (the one resumed) to
    ``.stale-step_N`` and point ``latest`` at ``checkpoint``: the run goes on from there, so the
    newer ones belong to no trajectory it continues, and kept among the published ones they
    would be resumed or counted as the newest by the retention rules."""
    newer = [path for path in published_checkpoints(checkpoint.parent)
             if checkpoint_step(path) > checkpoint_step(checkpoint)]
    for path in newer:
        stale = path.with_name(f"{STALE_PREFIX}{path.name}")
        os.replace(path, stale)
        logger.warning("set %s aside as %s: it is newer than %s, which this run resumes from; delete it "
                       "when it is no longer needed", path, stale.name, checkpoint)
    point_latest_at(checkpoint)  # also where the pointer was missing or named another


def plan_start(run) -> StartPoint:
    """Where ``run`` (a RunConfig) starts. Every rank calls it: rank 0 reads the folder and every
    rank follows its decision (the ranks share checkpoint verification). Raises ConfigError for
    a folder that holds another run."""
    train = run.train
    decision = [_decide(train) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(decision, src=0)
    kind, value = decision[0]
    if kind == "refuse":
        raise ConfigError(value)
    if kind == "fresh":
        return StartPoint(init_from=value)
    output_dir = Path(train.output_dir)
    checkpoint = _newest_verified(output_dir / "checkpoints", value)
    saved = _saved_init_from(checkpoint)
    if train.init_from and not _same_path(saved, train.init_from):
        raise ConfigError(
            f"train.init_from={train.init_from!r}, but {output_dir} already holds a run (checkpoint {checkpoint.name}) "
            f"that started from {saved or 'freshly initialised weights'}: " + _way_out(output_dir))
    differences = config_differences(checkpoint, run, ignore=LAYOUT_FIELDS)
    if differences:
        raise ConfigError(
            f"{output_dir} holds a run trained with other settings ({'; '.join(differences[:5])}): resume it "
            "with its own settings, or " + _way_out(output_dir))
    if dist.get_rank() == 0:
        _set_aside_newer(checkpoint)
    dist.barrier()
    return StartPoint(checkpoint=checkpoint)
