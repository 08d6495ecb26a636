"""The training loop: data → megatron-core forward/backward schedule → optimizer → metrics.

One step reads ``global_batch_size`` samples; this data-parallel rank takes its slice and runs
it as micro-batches through megatron-core's pipeline schedule, which scales the LM loss and the
router losses per micro-batch. Each micro-batch's documents (router ids, attention boundaries)
are computed once, on the host, as a DocumentBatch that every layer reads.
"""

import functools
import logging
import math
import sys
import time
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_emo.data.demo_data import prepare_demo_data
from megatron_emo.data.gpt_data import build_train_dataset, collate
from megatron_emo.data.indexed import check_dataset
from megatron_emo.data.tokenizer import Tokenizer
from megatron_emo.model.document_batch import DocumentBatch, run_model
from megatron_emo.model.gpt import build_model_chunks
from megatron_emo.config import ConfigError
from megatron_emo.recipes import RunConfig, validate_training_run
from megatron_emo.routing.router import DocumentPooledRouter
from megatron_emo.training.checkpoint import CheckpointSaver, load_checkpoint, load_weights
from megatron_emo.training.cpu_mode import megatron_device
from megatron_emo.training.flops import peak_tflops, training_flops_per_token
from megatron_emo.training.evaluate import build_validation_datasets, evaluate
from megatron_emo.training.guards import NonFiniteGuard, NonFiniteStep, SpikeDetector, StopSignal
from megatron_emo.parallel.grads import finalize_cpu_grads
from megatron_emo.parallel.shards import chunks_of
from megatron_emo.training.distributed import Runtime, init_model_parallel, init_process_group, shutdown_distributed
from megatron_emo.training.metrics import MetricsWriter
from megatron_emo.training.run_folder import plan_start
from megatron_emo.training.summary import run_summary
from megatron_emo.training.optimizer import USE_DISTRIBUTED_OPTIMIZER, cpu_stepper, gpu_stepper

logger = logging.getLogger(__name__)

def resolve_data(run: RunConfig) -> tuple[list[tuple[float, str]], Tokenizer]:
    """The blend and tokenizer of the run: the user's, or the demo corpus (built if missing)."""
    data = run.data
    if data.blend:
        return [tuple(entry) for entry in data.blend], Tokenizer(data.tokenizer_model)
    demo_dir = Path(data.cache_dir) / "demo"
    # Rank 0 builds the demo data; the others then find its manifest and reuse it.
    if torch.distributed.get_rank() == 0:
        prepare_demo_data(demo_dir, vocab_size=data.demo_vocab_size)
    torch.distributed.barrier()
    manifest = prepare_demo_data(demo_dir, vocab_size=data.demo_vocab_size)
    blend = [(1.0, entry["prefix"]) for entry in manifest["domains"].values()]
    return blend, Tokenizer(manifest["tokenizer"])


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed per-token cross-entropy and the token count; megatron-core divides."""
    total = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return total, num_tokens, {"lm_loss": torch.stack([total.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """megatron-core's forward step: one micro-batch (tokens, labels, loss mask, documents)."""
    tokens, labels, loss_mask, documents = next(data_iterator)
    output = run_model(model, tokens, documents, labels=labels)
    return output, functools.partial(_loss_func, loss_mask)


def to_device(batch: dict, documents: DocumentBatch, device) -> tuple:
    """A micro-batch as :func:`forward_step` reads it, on ``device``."""
    return (*(batch[key].to(device) for key in ("tokens", "labels", "loss_mask")), documents.to(device))


def microbatch_samples(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int):
    """Indices in the global batch of each micro-batch of data-parallel rank ``dp_rank``.

    Micro-batch j of every data-parallel rank together is one contiguous slice of the global
    batch, so the ranks' concurrent micro-batches hold the samples one process would run as one
    micro-batch of ``micro_batch_size x dp_size`` (the load-balancing statistics span them).
    """
    for first in range(dp_rank * micro_batch_size, global_batch_size, micro_batch_size * dp_size):
        yield torch.arange(first, first + micro_batch_size)


def _microbatches(dataset, run: RunConfig, runtime: Runtime, step: int, documents_of):
    """This rank's micro-batches of the step; ``documents_of``: DocumentBatch.of with the run's
    EOS id and routing seed."""
    data = run.data
    for sample_index in microbatch_samples(
        data.global_batch_size, data.micro_batch_size, runtime.data_parallel_rank, runtime.data_parallel_size
    ):
        batch = collate(dataset, step * data.global_batch_size + sample_index)
        documents = documents_of(batch["tokens"], step=step, sample_index=sample_index)
        yield to_device(batch, documents, runtime.device)


def _validation_batches(dataset, num_batches: int, *, run: RunConfig, runtime: Runtime, documents_of):
    """Consecutive micro-batches of a validation dataset (every rank evaluates all of them)."""
    size = run.data.micro_batch_size
    for start in range(0, num_batches * size, size):
        sample_index = torch.arange(start, start + size)
        batch = collate(dataset, sample_index)
        yield to_device(batch, documents_of(batch["tokens"], step=0, sample_index=sample_index), runtime.device)


def _routers(model) -> list[DocumentPooledRouter]:
    return [m for chunk in chunks_of(model) for m in chunk.modules() if isinstance(m, DocumentPooledRouter)]


def wrap_for_gpu(model, config):
    """bf16 modules and megatron-core DDP, with the schedule hooks megatron-core expects.

    ``model``: a module or a list of pipeline chunks; returns the same kind.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    wrapped = []
    for index, chunk in enumerate(chunks_of(model)):
        chunk = chunk.cuda()
        if config.bf16:
            chunk = Float16Module(config, chunk)
        # Only the first chunk's buckets overlap their reduction with the backward.
        wrapped.append(DistributedDataParallel(
            config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=USE_DISTRIBUTED_OPTIMIZER),
            module=chunk,
            disable_bucketing=index > 0,
        ))
    no_sync = [chunk.no_sync for chunk in wrapped]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped if isinstance(model, (list, tuple)) else wrapped[0]


def train(run: RunConfig) -> list[dict]:
    """Train ``run`` and return the logged records (also written to metrics.jsonl)."""
    validate_training_run(run)
    # A caller that set up the world (a test harness, a notebook) keeps it.
    owns_world = not torch.distributed.is_initialized()
    with megatron_device(), logging_redirect_tqdm():
        try:
            return _train(run)
        finally:
            shutdown_distributed(destroy_process_group=owns_world)


def _train(run: RunConfig) -> list[dict]:
    init_process_group()
    # megatron-core keeps the router-loss scale in a class attribute: start from its initial
    # state (a backward outside its schedules leaves a 0-d scale its schedules cannot copy into).
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    data = run.data
    blend, tokenizer = resolve_data(run)
    vocab_size = run.model_vocab_size(tokenizer.vocab_size)
    on_gpu = torch.cuda.is_available()
    config = run.emo_config(vocab_size=vocab_size, eos_token_id=tokenizer.eos_id, on_gpu=on_gpu)
    runtime = init_model_parallel(config, seed=run.train.seed)
    start = plan_start(run)  # before anything in the run folder is written
    if run.gpt.share_embeddings and config.pipeline_model_parallel_size > 1 and not runtime.on_gpu:
        # The CPU gradient reduction (parallel/grads.py) does not sum the tied copies' gradients.
        raise ConfigError("gpt.share_embeddings with pipeline parallelism is not supported on the CPU")
    if run.train.async_save and not runtime.on_gpu:
        raise ConfigError("train.async_save needs a GPU (on the CPU the state would change while it is written)")
    per_microbatch = data.micro_batch_size * runtime.data_parallel_size
    if data.global_batch_size % per_microbatch:
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size} is not a multiple of "
            f"data.micro_batch_size x data-parallel size = {per_microbatch}"
        )
    num_microbatches = data.global_batch_size // per_microbatch
    for _, prefix in blend:
        check_dataset(prefix, vocab_size=vocab_size, eos_id=tokenizer.eos_id)
    dataset = build_train_dataset(
        blend,
        tokenizer,
        seq_length=data.seq_length,
        num_samples=run.train.steps * data.global_batch_size,
        seed=data.seed,
        split=data.split,
        cache_dir=data.cache_dir,
    )

    validation = None
    if run.train.eval_interval:
        validation = build_validation_datasets(blend, tokenizer, num_samples=run.train.eval_samples, run=run)

    # This rank's pipeline chunks (one unless the schedule is interleaved).
    model = build_model_chunks(
        config,
        max_sequence_length=data.seq_length,
        rotary_base=run.gpt.rotary_base,
        share_embeddings=run.gpt.share_embeddings,
    )
    num_params = sum(p.numel() for chunk in model for p in chunk.parameters())
    gpt_model = model  # checkpoints hold the bare chunks' state, whatever wraps them
    if runtime.on_gpu:
        model = wrap_for_gpu(model, config)
        stepper = gpu_stepper(model, config, run.optim, run.train.steps)
        config.grad_scale_func = stepper.optimizer.scale_loss
    else:
        config.finalize_model_grads_func = finalize_cpu_grads
        stepper = cpu_stepper(model, run.optim, run.train.steps)
    routers = _routers(model)
    checkpoints = Path(run.train.output_dir) / "checkpoints"
    start_step = 0
    if start.checkpoint is not None:
        load_started = time.perf_counter()
        start_step = load_checkpoint(start.checkpoint, model=gpt_model, optimizer=stepper.optimizer,
                                     scheduler=stepper.scheduler, run=run, verified=True)
        load_seconds = time.perf_counter() - load_started
    elif start.init_from is not None:
        load_weights(start.init_from, gpt_model, run)

    writer = MetricsWriter(run, enabled=runtime.is_logging_rank, resume_step=start_step)
    if start.checkpoint is not None:
        writer.info(f"resumed from {start.checkpoint} at step {start_step} (loaded in {load_seconds:.1f} s)")
    elif start.init_from is not None:
        writer.info(f"started from the weights of {start.init_from}")
    if start_step >= run.train.steps:
        writer.info(f"{run.train.output_dir} already finished at step {start_step} of train.steps={run.train.steps}: "
                    "nothing to train (raise train.steps to train longer)")
    writer.info(
        f"{run.name}: {num_params / 1e6:.2f}M parameters on this rank, {len(blend)} datasets, "
        f"{data.seq_length}-token samples, vocab {vocab_size}, router {config.emo_router_mode}, "
        f"device {runtime.device}, world {runtime.world_size}"
    )
    forward_backward = get_forward_backward_func()
    documents_of = functools.partial(DocumentBatch.of, eos_token_id=tokenizer.eos_id, seed=config.emo_routing_seed)
    flops_per_token = training_flops_per_token(config, seq_length=data.seq_length, vocab_size=vocab_size)
    peak = peak_tflops(runtime.device)
    writer.info(f"{flops_per_token / 1e9:.3f} GFLOP per token for training (formula: "
                f"megatron_emo/training/flops.py); MFU against {peak or 'no known'} TFLOP/s peak")
    guard = NonFiniteGuard(run.train.nan_policy, run.train.max_nan_skips)
    spikes = SpikeDetector(run.train.spike_factor)
    records = []
    stop = StopSignal()

    saver = CheckpointSaver(checkpoints, run=run, tokenizer_file=tokenizer.model_file,
                            asynchronous=run.train.async_save,
                            on_published=lambda path, seconds: writer.info(f"saved {path} in {seconds:.1f} s"))

    def save(done: int) -> None:
        saver.save(done, model=gpt_model, optimizer=stepper.optimizer, scheduler=stepper.scheduler)

    # A progress bar with ETA on an interactive terminal; plain log lines in batch jobs.
    progress = tqdm(total=run.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not (runtime.is_logging_rank and sys.stderr.isatty()))
    try:
        for step in range(start_step, run.train.steps):
            progress.update(1)
            saver.poll()
            started = time.perf_counter()
            lr = stepper.optimizer.param_groups[0]["lr"]
            losses = forward_backward_step(step, model, stepper, forward_backward, dataset, run, runtime,
                                           num_microbatches, documents_of)
            loss = mean_loss(losses, runtime)
            grad_norm, applied = stepper.step() if math.isfinite(loss) else (float("nan"), False)
            if applied:
                guard.good_step()
                stepper.scheduler.step(increment=1)
                spikes.observe(step + 1, loss)
            else:
                try:
                    guard.bad_step(step, loss, grad_norm, model)
                except NonFiniteStep:
                    if run.train.save:
                        save(step)  # the parameters are still those of the last good step
                        saver.wait()
                    raise
            if runtime.on_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            done = step + 1
            if done % run.train.log_interval == 0 or done == run.train.steps:
                tokens_per_s = data.global_batch_size * data.seq_length / elapsed
                record = {"step": done, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                          "tokens_per_s": tokens_per_s, "step_time_s": elapsed,
                          "tflops_per_gpu": flops_per_token * tokens_per_s / runtime.world_size / 1e12}
                if peak is not None:
                    record["mfu"] = record["tflops_per_gpu"] / peak
                if runtime.on_gpu:
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                record.update(_router_summary([router.metrics.read() for router in routers]))
                records.append(record)
                writer.write(record)
            if validation and (done % run.train.eval_interval == 0 or done == run.train.steps):
                results = evaluate(model, config, validation, forward_backward=forward_backward,
                                   forward_step=forward_step, run=run, runtime=runtime,
                                   microbatches=functools.partial(_validation_batches, run=run, runtime=runtime,
                                                                  documents_of=documents_of))
                writer.write_eval(done, results)
            if stop.received:
                writer.info(f"{stop.received} received: stopping after step {done}")
            if run.train.save and (done % run.train.save_interval == 0 or done == run.train.steps or stop.received):
                save(done)
            if stop.received:
                break
        saver.wait()  # the last checkpoint is published before the run reports success
        for line in run_summary(Path(run.train.output_dir), steps=run.train.steps):
            writer.info(line)
    finally:
        saver.close()
        progress.close()
        stop.restore()
        writer.close()
    return records


def forward_backward_step(step, model, stepper, forward_backward, dataset, run, runtime, num_microbatches,
                          documents_of) -> list[dict]:
    """Gradients of one step's batch (this rank's micro-batches); the per-micro-batch losses.
    ``model``: a module or this rank's list of pipeline chunks (each reads the micro-batches)."""
    chunks = chunks_of(model)
    for chunk in chunks:
        chunk.train()
    stepper.zero_grad()
    iterators = [_microbatches(dataset, run, runtime, step, documents_of) for _ in chunks]
    return forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=run.data.seq_length,
        micro_batch_size=run.data.micro_batch_size,
        forward_only=False,
    )


def mean_loss(losses: list[dict], runtime: Runtime) -> float:
    """Token-weighted LM loss of the step over the data-parallel ranks, known on every rank
    (the last pipeline stage has it; the others receive it), so all ranks skip alike."""
    totals = torch.zeros(2, device=runtime.device)
    if parallel_state.is_pipeline_last_stage():
        totals = torch.stack([item["lm_loss"] for item in losses]).sum(dim=0)
        if runtime.data_parallel_size > 1:
            torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    total, count = totals.tolist()
    return total / count


def _router_summary(per_layer: list[dict]) -> dict:
    """The MoE part of a step record: losses and pool size averaged over this stage's layers;
    expert load max/mean and the fraction of unused routed experts per layer (lists, layer
    order), since imbalance and dead experts show up in single layers."""
    per_layer = [stats for stats in per_layer if stats]
    if not per_layer:
        return {}
    summary = {key: sum(stats[key] for stats in per_layer) / len(per_layer)
               for key in ("lb_loss", "z_loss", "pool_experts")}
    for key in ("load_max_over_mean", "unused_experts"):
        summary[key] = [round(stats[key], 3) for stats in per_layer]
    return summary
