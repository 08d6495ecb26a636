"""Training samples through megatron-core's GPTDataset and BlendedDataset.

Documents (each ending with EOS) are concatenated and cut into ``seq_length + 1``-token samples
with no padding, shuffled deterministically from the seed, and mixed over several datasets by
weight; megatron-core caches the sample indices in ``cache_dir``. Sample ``i`` of the training
split is a pure function of ``i``, so a run resumes at the exact sample and the batch does not
depend on the parallel layout.
"""

import os

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_emo.data.tokenizer import Tokenizer


def gpt_dataset_config(blend, tokenizer: Tokenizer, *, seq_length: int, seed: int, split: str,
                       cache_dir: str | os.PathLike) -> GPTDatasetConfig:
    """megatron-core's dataset config for a blend ``[(weight, prefix), ...]``."""
    weights = [float(weight) for weight, _ in blend]
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(prefix) for _, prefix in blend], weights),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        # EMO trains on packed documents; document masking and ids are ours (from EOS tokens).
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_train_dataset(
    blend: list[tuple[float, str]],
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    num_samples: int,
    seed: int,
    split: str,
    cache_dir: str | os.PathLike,
):
    """The training split of a weighted blend of indexed datasets (``[(weight, prefix), ...]``).

    Returns:
        a dataset whose item ``i`` is a dict with int64 ``tokens`` and ``labels`` ``[seq_length]``
        and fp32 ``loss_mask``.
    """
    config = gpt_dataset_config(blend, tokenizer, seq_length=seq_length, seed=seed, split=split, cache_dir=cache_dir)
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, 0, 0], lambda: True, config
    ).build()
    if train is None:
        raise ValueError(f"data.split={split!r} leaves no training data")
    return train


def collate(dataset, sample_indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stack the samples at ``sample_indices`` (int ``[b]``) into ``[b, seq_length]`` tensors."""
    samples = [dataset[int(index)] for index in sample_indices]
    return {key: torch.stack([sample[key] for sample in samples]) for key in ("tokens", "labels", "loss_mask")}
