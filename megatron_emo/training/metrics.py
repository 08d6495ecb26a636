"""Where step records go: the console, ``metrics.jsonl``, TensorBoard and optionally Weights &
Biases (logging rank only).

A record is a flat dict: floats are run-wide scalars (``train/<key>``), lists hold one value per
MoE layer (``router/<key>/layer<n>``); :func:`scalars` gives the tags every backend shares.
"""

import dataclasses
import importlib.metadata
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

import torch

from megatron_emo.recipes import RunConfig

logger = logging.getLogger("megatron_emo")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info() -> dict:
    """The exact command, versions and code a run was started with."""
    packages = {}
    for name in ("torch", "megatron-core", "megatron_emo", "triton", "sentencepiece", "numpy"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "command": [sys.executable, *sys.argv],
        "python": platform.python_version(),
        "host": platform.node(),
        "packages": packages,
        "git_commit": _git_commit(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


CONSOLE_LAYER_MEANS = ("unused_experts",)
"""Per-layer lists the console shows as their mean over layers: a second full list would double
the line at 16 layers; the per-layer values are in metrics.jsonl and TensorBoard."""


def format_record(record: dict) -> str:
    """One console line: ``key value | ...``."""
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, list) and key in CONSOLE_LAYER_MEANS:
            parts.append(f"{key} {sum(value) / len(value):.3f}")
        elif isinstance(value, list):
            parts.append(f"{key} [{' '.join(f'{v:.2f}' for v in value)}]")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values of a step record (the step itself excluded)."""
    tags = {}
    for key, value in record.items():
        if isinstance(value, float):
            tags[f"train/{key}"] = value
        elif isinstance(value, list):
            for layer, layer_value in enumerate(value, start=1):
                tags[f"router/{key}/layer{layer}"] = layer_value
    return tags


class MetricsWriter:
    """Writes a run's records on the logging rank; a no-op elsewhere (``enabled=False``)."""

    def __init__(self, run: RunConfig, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        self.output_dir = Path(run.train.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(run)
        (self.output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
        (self.output_dir / "run_info.json").write_text(json.dumps(run_info(), indent=2))
        self.jsonl = self._open_jsonl(self.output_dir / "metrics.jsonl", resume_step)
        self.eval_jsonl = self._open_jsonl(self.output_dir / "eval.jsonl", resume_step)
        if run.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # As in metrics.jsonl, a resumed run hides the events its predecessor logged after
            # the checkpoint (TensorBoard drops steps >= purge_step of earlier event files).
            self.tensorboard = SummaryWriter(self.output_dir / "tensorboard",
                                             purge_step=resume_step + 1 if resume_step else None)
        if run.train.wandb_project is not None:
            # Imported only when asked for: wandb is not an install requirement (validate_run
            # has checked that it is there).
            import wandb

            # The config as run_config.json holds it (plain JSON values: W&B stores it so).
            self.wandb = wandb.init(project=run.train.wandb_project, name=run.name, dir=str(self.output_dir),
                                    config=json.loads(json.dumps(config, default=str)))

    @staticmethod
    def _open_jsonl(path: Path, resume_step: int):
        """A resumed run continues the records up to its checkpoint; later ones (logged after
        that checkpoint by the run that died) are dropped, since the steps run again."""
        kept = []
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        jsonl = open(path, "w")
        jsonl.writelines(line + "\n" for line in kept)
        return jsonl

    def info(self, message: str) -> None:
        if self.enabled:
            logger.info(message)

    def write(self, record: dict) -> None:
        """One step's record to the console, metrics.jsonl, TensorBoard and W&B."""
        if not self.enabled:
            return
        logger.info(format_record(record))
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self._log_scalars(scalars(record), record["step"])

    def write_eval(self, step: int, results: dict) -> None:
        """Validation losses (``eval/<domain>/<pool>`` → loss) to the console, eval.jsonl,
        TensorBoard and W&B."""
        if not self.enabled or not results:
            return
        logger.info("eval step %d | %s", step, " | ".join(f"{k[5:]} {v:.4g}" for k, v in results.items()))
        self.eval_jsonl.write(json.dumps({"step": step, **results}) + "\n")
        self.eval_jsonl.flush()
        self._log_scalars(results, step)

    def _log_scalars(self, tags: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in tags.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(tags, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.eval_jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
