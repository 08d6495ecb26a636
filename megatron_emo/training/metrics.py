"""Where step records go: the console, ``metrics.jsonl`` and TensorBoard (logging rank only)."""

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


def format_record(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, list):
            parts.append(f"{key} [{' '.join(f'{v:.2f}' for v in value)}]")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class MetricsWriter:
    def __init__(self, run: RunConfig, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        self.output_dir = Path(run.train.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(run)
        (self.output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
        (self.output_dir / "run_info.json").write_text(json.dumps(run_info(), indent=2))
        self.jsonl = self._open_jsonl(self.output_dir / "metrics.jsonl", resume_step)
        if run.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(self.output_dir / "tensorboard")

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
        if not self.enabled:
            return
        logger.info(format_record(record))
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
                elif isinstance(value, list):
                    for layer, layer_value in enumerate(value, start=1):
                        self.tensorboard.add_scalar(f"router/{key}/layer{layer}", layer_value, record["step"])

    def write_eval(self, step: int, results: dict) -> None:
        """Validation losses (``eval/<domain>/<pool>`` → loss) to the console, eval.jsonl and
        TensorBoard."""
        if not self.enabled or not results:
            return
        logger.info("eval step %d | %s", step, " | ".join(f"{k[5:]} {v:.4g}" for k, v in results.items()))
        with open(self.output_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        if self.tensorboard is not None:
            for key, value in results.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
