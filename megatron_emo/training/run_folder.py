"""Where a run starts, decided before anything in its output folder is written.

    the folder holds                      train.resume=True              train.resume=False
    nothing of a run                      step 0 (init_from's weights)   step 0 (init_from's weights)
    checkpoints                           the newest one that verifies   refused
    metrics but no checkpoint             refused                        refused
    checkpoints of another init_from      refused                        refused

The newest checkpoint is the one ``latest`` names. When that pointer is missing, or its
checkpoint does not verify (truncated, tampered), the newest other checkpoint that verifies is
taken and the warning names both; when none verifies the error lists each one's fault. A
refusal names the way out: another ``train.output_dir``, or deleting the folder. So a run is
never restarted over, mixed with or truncated into another run's files.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_emo.config import ConfigError
from megatron_emo.training.checkpoint import (
    LATEST,
    RUN_CONFIG,
    CheckpointError,
    checkpoint_step,
    published_checkpoints,
    report_unfinished_saves,
    verify_checkpoint,
)

logger = logging.getLogger(__name__)

METRICS_FILES = ("metrics.jsonl", "eval.jsonl")


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


def plan_start(train) -> StartPoint:
    """Where the run of ``train`` (a TrainConfig) starts; every rank calls it (the ranks share
    checkpoint verification). Raises ConfigError for a folder that holds another run."""
    output_dir = Path(train.output_dir)
    root = output_dir / "checkpoints"
    init_from = Path(train.init_from) if train.init_from else None
    report_unfinished_saves(root)
    published = published_checkpoints(root)
    if not published:
        if _has_records(output_dir):
            raise ConfigError(
                f"{output_dir} holds the metrics of an earlier run but no checkpoint to resume it from: "
                + _way_out(output_dir))
        return StartPoint(init_from=init_from)
    newest = checkpoint_step(published[-1])
    if not train.resume:
        raise ConfigError(
            f"{output_dir} already holds a run (checkpoints up to step {newest}) and train.resume=False: "
            f"resume it (train.resume=True), or {_way_out(output_dir)}")
    checkpoint = _newest_verified(root, resume_candidates(root, published))
    saved = _saved_init_from(checkpoint)
    if train.init_from and saved != train.init_from:
        raise ConfigError(
            f"train.init_from={train.init_from!r}, but {output_dir} already holds a run (checkpoints up to "
            f"step {newest}) that started from {saved or 'freshly initialised weights'}: "
            + _way_out(output_dir))
    return StartPoint(checkpoint=checkpoint)
