"""Read a megatron_emo training checkpoint for conversion: find it, verify it, rebuild its config.

A checkpoint (see :mod:`megatron_emo.checkpoint.store`) is ``<run>/checkpoints/step_N/``: a
megatron-core sharded checkpoint whose model tensors are keyed and shaped as one process holds
them, ``run_config.json`` (``dataclasses.asdict(RunConfig)``) and ``manifest.json``. Whatever
layout saved it, the weights are read whole here. The model config is rebuilt as the training
loop builds it, except that the vocabulary is the checkpoint's embedding rows (the padded size
the run used) and parallelism is reset to one rank.
"""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron.core import dist_checkpointing

from megatron_emo.checkpoint.store import (
    LATEST,
    MANIFEST,
    TOKENIZER_FILE,
    CheckpointError,
    find_latest,
    read_tensors,
    verify_checkpoint,
)
from megatron_emo.config import ConfigError, EmoConfig
from megatron_emo.convert.qwen2_moe import GPTSettings
from megatron_emo.parallel.layout import PARALLEL_FIELDS
from megatron_emo.recipes import RunConfig
from megatron_emo.training.distributed import process_group

logger = logging.getLogger(__name__)

def resolve_checkpoint(path: os.PathLike) -> Path:
    """``step_N`` folder, a run's ``checkpoints`` folder or the run's output folder (→ newest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / MANIFEST).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            latest = find_latest(root)
            if latest is not None:
                return latest
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a step_N folder with {MANIFEST}, or a folder with a "
        f"'{LATEST}' pointer (a run's checkpoints folder)"
    )


def run_config_from_dict(values: dict) -> RunConfig:
    """RunConfig from ``run_config.json``; section fields this version does not know are logged
    and skipped (a checkpoint of a newer or older megatron_emo). The model section is checked as
    any run's: an unknown model field raises ConfigError, as the model could not be rebuilt."""
    kwargs = {"name": values.get("name", "unknown"), "model": dict(values.get("model", {}))}
    for f in dataclasses.fields(RunConfig):
        if f.name in ("name", "model"):
            continue
        section = f.default_factory()
        known = {g.name for g in dataclasses.fields(section)}
        for key, value in values.get(f.name, {}).items():
            if key in known:
                setattr(section, key, value)
            else:
                logger.warning("run_config.json: ignoring unknown field %s.%s", f.name, key)
        kwargs[f.name] = section
    return RunConfig(**kwargs)


def read_run_config(checkpoint: Path) -> RunConfig:
    path = checkpoint / "run_config.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint}: {path} is missing")
    try:
        return run_config_from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {checkpoint}: {path} is not a run config ({error})") from error


def find_tokenizer(run: RunConfig, checkpoint: Path, override: Optional[os.PathLike] = None) -> Path:
    """The SentencePiece model the run trained with.

    ``override``, else the checkpoint's own copy, else ``data.tokenizer_model``, else (demo
    corpus) ``data.cache_dir/demo/tokenizer.model``, else a ``tokenizer.model`` in the run's
    output folder.
    """
    if override is not None:
        if not Path(override).is_file():
            raise FileNotFoundError(f"tokenizer model {override} does not exist")
        return Path(override)
    if run.data.tokenizer_model:
        first = Path(run.data.tokenizer_model)
    else:
        first = Path(run.data.cache_dir) / "demo" / "tokenizer.model"
    candidates = [checkpoint / TOKENIZER_FILE, first, Path(run.train.output_dir) / "tokenizer.model",
                  checkpoint.parent.parent / "tokenizer.model"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the run's tokenizer is not found (tried {', '.join(map(str, candidates))}): pass --tokenizer-model"
    )


@dataclass
class LoadedCheckpoint:
    path: Path
    run: RunConfig
    step: int
    state_dict: dict
    """The one-process weights by GPTModel parameter name."""

    def vocab_size(self) -> int:
        return self.state_dict["embedding.word_embeddings.weight"].shape[0]

    def emo_config(self, *, eos_token_id: int, **overrides) -> EmoConfig:
        """The model config, one rank; ``overrides`` are EmoConfig fields (e.g. emo_eval_pool=None).
        The run's layout fields are dropped: the checkpoint's tensors are whole."""
        model = {k: v for k, v in self.run.model.items() if k not in PARALLEL_FIELDS}
        run = dataclasses.replace(self.run, model={**model, **overrides})
        return run.emo_config(vocab_size=self.vocab_size(), eos_token_id=eos_token_id, on_gpu=False)

    def gpt_settings(self) -> GPTSettings:
        return GPTSettings(
            rotary_base=self.run.gpt.rotary_base,
            share_embeddings=self.run.gpt.share_embeddings,
            max_position_embeddings=self.run.data.seq_length,
        )


def load_checkpoint_for_export(path: os.PathLike, *, verify: bool = True) -> LoadedCheckpoint:
    """Resolve, verify (sizes and SHA-256 against the manifest) and load a checkpoint's model."""
    checkpoint = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(checkpoint)
    run = read_run_config(checkpoint)
    try:
        with process_group():
            model = read_tensors(checkpoint)
            step = dist_checkpointing.load_common_state_dict(str(checkpoint)).get("step", -1)
    except Exception as error:  # noqa: BLE001  (any failure to read the files means a bad checkpoint)
        raise CheckpointError(f"checkpoint {checkpoint} cannot be read ({type(error).__name__}: {error})") from error
    if "embedding.word_embeddings.weight" not in model:
        raise CheckpointError(
            f"checkpoint {checkpoint}: the model state has no embedding.word_embeddings.weight "
            "(not a megatron_emo GPTModel)"
        )
    return LoadedCheckpoint(path=checkpoint, run=run, step=int(step), state_dict=model)
