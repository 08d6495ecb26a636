"""Validation loss on held-out data, per domain, with the router's eval pool and with no pool.

EMO evaluates inside training with a fixed pool (``emo_eval_pool``, 32 for the flagship), while
the exported Hugging Face model routes with no pool at all; both are measured. The held-out data
is the validation split of each dataset of the blend (each dataset is one domain).
"""

import contextlib
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_emo.data.gpt_data import gpt_dataset_config
from megatron_emo.parallel.shards import chunks_of
from megatron_emo.training.step import forward_step


def build_validation_datasets(blend, tokenizer, *, num_samples: int, run) -> dict[str, object]:
    """The validation split of every dataset of the blend, by domain (the prefix's name)."""
    datasets = {}
    for _, prefix in blend:
        config = gpt_dataset_config([(1.0, prefix)], tokenizer, seq_length=run.data.seq_length,
                                    seed=run.data.seed, split=run.data.split, cache_dir=run.data.cache_dir)
        _, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [0, num_samples, 0], lambda: True, config).build()
        if valid is None:
            raise ValueError(f"data.split={run.data.split!r} leaves no validation data for {prefix}")
        datasets[Path(prefix).name] = valid
    return datasets


@contextlib.contextmanager
def eval_pool(config, pool):
    """Route with ``pool`` in eval mode for the block (every router reads the shared config)."""
    saved = config.emo_eval_pool
    config.emo_eval_pool = pool
    try:
        yield
    finally:
        config.emo_eval_pool = saved


def pools_to_evaluate(config) -> dict[str, object]:
    """Named eval settings: the configured eval pool, and no pool (once if they coincide)."""
    if config.emo_router_mode == "topk" or config.emo_eval_pool is None:
        return {"no_pool": None}
    return {f"pool{config.emo_eval_pool}": config.emo_eval_pool, "no_pool": None}


def evaluate(model, config, datasets, *, run, microbatches) -> dict:
    """Mean LM loss per ``eval/<domain>/<pool setting>`` over each validation dataset (``model``: a
    module or this rank's list of pipeline chunks; ``microbatches(dataset, num_batches)``: an
    iterator over a dataset's first micro-batches, as the training step's forward step reads
    them)."""
    data = run.data
    results = {}
    chunks = chunks_of(model)
    for chunk in chunks:
        chunk.eval()
    for domain, dataset in datasets.items():
        num_batches = len(dataset) // data.micro_batch_size
        if num_batches == 0:
            continue
        for name, pool in pools_to_evaluate(config).items():
            with eval_pool(config, pool), torch.no_grad():
                losses = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=[microbatches(dataset, num_batches) for _ in chunks] if len(chunks) > 1
                    else microbatches(dataset, num_batches),
                    model=chunks,
                    num_microbatches=num_batches,
                    seq_length=data.seq_length,
                    micro_batch_size=data.micro_batch_size,
                    forward_only=True,
                )
            if losses:
                total, count = torch.stack([item["lm_loss"] for item in losses]).sum(dim=0).tolist()
                results[f"eval/{domain}/{name}"] = total / count
    for chunk in chunks:
        chunk.train()
    return results
