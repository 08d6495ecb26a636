"""One training step (or a few) of a tiny EMO model under any parallel layout, in one-process
terms, to compare layouts with each other.

:func:`run_layout` is the body of every rank (see :func:`megatron_emo.testing.distributed.run_distributed`):
it builds the model for its place in the layout, loads one-process weights (or keeps its own
initialisation when given none), trains with the trainer's step (megatron_emo.training.step:
megatron-core DDP, distributed optimizer and schedules, as on a GPU cluster) over a fixed global
batch and returns, on rank 0, what one process would see: the LM loss of every step, the
router's choices (expert indices and gate weights per layer and sample), and the gradients and
weights of the first step joined to one-process tensors.
"""


import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_emo.checkpoint.sharded_state import full_tensors, load_full_weights
from megatron_emo.config import EmoConfig
from megatron_emo.model.document_batch import document_batcher
from megatron_emo.model.gpt import build_model_chunks
from megatron_emo.recipes import OptimConfig
from megatron_emo.routing.router import DocumentPooledRouter
from megatron_emo.training.cpu_mode import cuda_on_cpu
from megatron_emo.training.distributed import init_model_parallel
from megatron_emo.training.step import BatchShape, build_trainer, microbatch_samples

EOS = 2
ROUTING_SEED = 7


def tiny_config(**layout) -> EmoConfig:
    """2 layers, d 16, 4 heads, 1 shared + 8 routed experts of width 8, top-3, fp32 on CPU."""
    fields = dict(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=4,
        ffn_hidden_size=32,
        num_moe_experts=9,
        moe_router_topk=3,
        moe_ffn_hidden_size=8,
        emo_vocab_size=64,
        emo_eos_token_id=EOS,
        emo_pool_min=3,
        emo_pool_max=6,
        emo_eval_pool=4,
        emo_routing_seed=ROUTING_SEED,
        pipeline_dtype=torch.float32,
    )
    return EmoConfig(**{**fields, **layout})


def fixed_batch(global_batch_size: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """int64 ``[G, S + 1]`` token rows with several EOS-separated documents each."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 64, (global_batch_size, seq_length + 1), generator=generator)
    starts = torch.rand(global_batch_size, seq_length + 1, generator=generator) < 0.15
    tokens[starts] = EOS
    return tokens


def _batches(tokens: torch.Tensor, micro_batch_size: int, step: int, documents_of):
    rows = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].contiguous()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    for index in microbatch_samples(tokens.shape[0], micro_batch_size, dp_rank, dp_size):
        sample_index = index + step * tokens.shape[0]
        documents = documents_of(rows[index], step=step, sample_index=sample_index)
        yield (rows[index], labels[index], torch.ones(len(index), rows.shape[1]), documents), sample_index


def _record_routes(model, routes: dict, sample_index: list):
    """Forward hooks keeping each router's (weights, indices) per (layer, global sample)."""

    def hook(router, args, output):
        if not router.training:
            return
        weights, indices = output
        batch = len(sample_index[0])
        for tensor, kind in ((weights, "weights"), (indices, "indices")):
            per_sample = tensor.detach().view(-1, batch, tensor.shape[-1]).transpose(0, 1)
            for row, sample in enumerate(sample_index[0].tolist()):
                routes[(kind, router.layer_number, sample)] = per_sample[row].clone()

    return [m.register_forward_hook(hook) for chunk in model for m in chunk.modules()
            if isinstance(m, DocumentPooledRouter)]


def run_layout(rank: int, world_size: int, layout: dict, micro_batch_size: int, tokens: torch.Tensor,
               weights=None, steps: int = 1, seed: int = 0):
    """Train ``steps`` steps of :func:`tiny_config` under ``layout`` on the global batch ``tokens``.

    Returns:
        On rank 0: ``{"losses": [per step], "routes": {(kind, layer, sample): tensor},
        "grads": {name: one-process gradient of step 1}, "weights": {name: initial weights}}``;
        None on the other ranks.
    """
    with cuda_on_cpu():
        config = tiny_config(**layout)
        runtime = init_model_parallel(config, seed=seed)
        try:
            return _train(config, runtime, micro_batch_size, tokens, weights, steps)
        finally:
            parallel_state.destroy_model_parallel()


def reduced_gradients(trainer) -> None:
    """Fill every rank's gradient buffers with the whole reduced gradients.

    With the distributed optimizer, DDP reduce-scatters: each data-parallel rank holds only its
    own shard of every bucket reduced. Gathering the shards (as the optimizer gathers updated
    weights) lets a test read any parameter's reduced gradient from ``param.main_grad``."""
    for chunk in trainer.chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            group = buffer.data_parallel_group
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            for bucket in buffer.buckets:
                shard = bucket.grad_data.numel() // size
                local = bucket.grad_data[rank * shard:(rank + 1) * shard].clone()
                dist.all_gather_into_tensor(bucket.grad_data, local, group=group)


def _train(config, runtime, micro_batch_size, tokens, weights, steps):
    seq_length = tokens.shape[1] - 1
    model = build_model_chunks(config, max_sequence_length=seq_length, rotary_base=10_000)
    if weights is not None:
        load_full_weights(model, config, weights)
    initial = full_tensors(model, config, lambda param: param)
    shape = BatchShape(seq_length, micro_batch_size, tokens.shape[0] // (micro_batch_size * runtime.data_parallel_size))
    trainer = build_trainer(model, config, OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0), shape,
                            total_steps=steps, device=runtime.device)
    routes, sample_index, grads, losses = {}, [None], None, []
    hooks = _record_routes(model, routes, sample_index)

    def batches(step):
        for batch, index in _batches(tokens, micro_batch_size, step, document_batcher(config, EOS)):
            sample_index[0] = index
            yield batch

    for step in range(steps):
        losses.append(trainer.gradients(functools.partial(batches, step)))
        if step == 0:
            reduced_gradients(trainer)
            grads = full_tensors(model, config, lambda param: param.main_grad)
            for hook in hooks:
                hook.remove()
        trainer.update()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(routes, gathered, dst=0)
    if gathered is None:
        return None
    all_routes = {key: value for rank_routes in gathered for key, value in rank_routes.items()}
    return {"losses": losses, "routes": all_routes, "grads": grads, "weights": initial}
