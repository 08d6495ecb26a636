"""The training loop: data → one training step (training/step.py) → metrics, evaluation,
checkpoints.

One step reads ``global_batch_size`` samples; this data-parallel rank takes its slice and runs
it as micro-batches through megatron-core's pipeline schedule, which scales the LM loss and the
router losses per micro-batch. Each micro-batch's documents (router ids, attention boundaries)
are computed once, on the host, as a DocumentBatch that every layer reads.

:func:`train` reads as the run goes: the data, the trainer, the starting point (fresh, resumed,
or from other weights), then :func:`_run_steps`.
"""

import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megatron_emo.checkpoint.store import CheckpointSaver, load_checkpoint, load_weights
from megatron_emo.config import EmoConfig
from megatron_emo.data.demo_data import prepare_demo_data
from megatron_emo.data.gpt_data import build_train_dataset, collate
from megatron_emo.data.indexed import check_dataset
from megatron_emo.data.tokenizer import Tokenizer
from megatron_emo.model.document_batch import document_batcher
from megatron_emo.model.gpt import build_model_chunks
from megatron_emo.recipes import RunConfig
from megatron_emo.routing.router import DocumentPooledRouter
from megatron_emo.training.cpu_mode import megatron_device
from megatron_emo.training.distributed import Runtime, init_model_parallel, init_process_group, shutdown_distributed
from megatron_emo.training.evaluate import build_validation_datasets, evaluate
from megatron_emo.training.flops import peak_tflops, training_flops_per_token
from megatron_emo.training.guards import NonFiniteGuard, NonFiniteStep, SpikeDetector, StopSignal
from megatron_emo.training.metrics import MetricsWriter
from megatron_emo.training.run_folder import StartPoint, plan_start
from megatron_emo.training.step import BatchShape, StepResult, Trainer, build_trainer, microbatch_samples, to_device
from megatron_emo.training.summary import run_summary
from megatron_emo.validate import check_world, validate_training_run

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """The data side of a run: the blend, its tokenizer, the training samples and the
    validation datasets by domain (None without evaluation)."""

    blend: list[tuple[float, str]]
    tokenizer: Tokenizer
    vocab_size: int
    train: object
    validation: dict | None


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


def microbatches(dataset, run: RunConfig, runtime: Runtime, step: int, documents_of):
    """This rank's micro-batches of the step; ``documents_of``: the run's
    :func:`~megatron_emo.model.document_batch.document_batcher`."""
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


def _routers(trainer: Trainer) -> list[DocumentPooledRouter]:
    return [m for chunk in trainer.model for m in chunk.modules() if isinstance(m, DocumentPooledRouter)]


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
    blend, tokenizer = resolve_data(run)
    vocab_size = run.model_vocab_size(tokenizer.vocab_size)
    config = run.emo_config(vocab_size=vocab_size, eos_token_id=tokenizer.eos_id, on_gpu=torch.cuda.is_available())
    runtime = init_model_parallel(config, seed=run.train.seed)
    start = plan_start(run)  # before anything in the run folder is written
    shape = _batch_shape(run, config, runtime)
    data = _build_data(run, blend, tokenizer, vocab_size)
    model = build_model_chunks(config, max_sequence_length=run.data.seq_length, rotary_base=run.gpt.rotary_base,
                               share_embeddings=run.gpt.share_embeddings)
    trainer = build_trainer(model, config, run.optim, shape, total_steps=run.train.steps, device=runtime.device)
    start_step, notes = _start(start, trainer, run)
    writer = MetricsWriter(run, enabled=runtime.is_logging_rank, resume_step=start_step)
    for note in notes:
        writer.info(note)
    num_params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    writer.info(
        f"{run.name}: {num_params / 1e6:.2f}M parameters on this rank, {len(blend)} datasets, "
        f"{run.data.seq_length}-token samples, vocab {vocab_size}, router {config.emo_router_mode}, "
        f"device {runtime.device}, world {runtime.world_size}"
    )
    try:
        return _run_steps(run, trainer, config, data, runtime, writer, start_step)
    finally:
        writer.close()


def _batch_shape(run: RunConfig, config: EmoConfig, runtime: Runtime) -> BatchShape:
    check_world(run, config, runtime.world_size, on_gpu=runtime.on_gpu)
    data = run.data
    per_microbatch = data.micro_batch_size * runtime.data_parallel_size
    return BatchShape(data.seq_length, data.micro_batch_size, data.global_batch_size // per_microbatch)


def _build_data(run: RunConfig, blend, tokenizer: Tokenizer, vocab_size: int) -> RunData:
    for _, prefix in blend:
        check_dataset(prefix, vocab_size=vocab_size, eos_id=tokenizer.eos_id)
    data = run.data
    dataset = build_train_dataset(blend, tokenizer, seq_length=data.seq_length,
                                  num_samples=run.train.steps * data.global_batch_size, seed=data.seed,
                                  split=data.split, cache_dir=data.cache_dir)
    validation = None
    if run.train.eval_interval:
        validation = build_validation_datasets(blend, tokenizer, num_samples=run.train.eval_samples, run=run)
    return RunData(blend, tokenizer, vocab_size, dataset, validation)


def _start(start: StartPoint, trainer: Trainer, run: RunConfig) -> tuple[int, list[str]]:
    """Load what the run starts from (its checkpoint, or other weights); the first step to run
    and what to tell the user about it."""
    if start.checkpoint is not None:
        load_started = time.perf_counter()
        step = load_checkpoint(start.checkpoint, model=trainer.model, optimizer=trainer.optimizer,
                               scheduler=trainer.scheduler, run=run, verified=True)
        load_seconds = time.perf_counter() - load_started
        notes = [f"resumed from {start.checkpoint} at step {step} (loaded in {load_seconds:.1f} s)"]
        if step >= run.train.steps:
            notes.append(f"{run.train.output_dir} already finished at step {step} of train.steps={run.train.steps}: "
                         "nothing to train (raise train.steps to train longer)")
        return step, notes
    if start.init_from is not None:
        load_weights(start.init_from, trainer.model, run)
        return 0, [f"started from the weights of {start.init_from}"]
    return 0, []


def _run_steps(run: RunConfig, trainer: Trainer, config: EmoConfig, data: RunData, runtime: Runtime,
               writer: MetricsWriter, start_step: int) -> list[dict]:
    """Steps ``start_step`` .. ``train.steps``, with logging, evaluation, checkpoints, non-finite
    step handling and stop signals; the logged records."""
    documents_of = document_batcher(config, data.tokenizer.eos_id)
    flops_per_token = training_flops_per_token(config, seq_length=run.data.seq_length, vocab_size=data.vocab_size)
    peak = peak_tflops(runtime.device)
    writer.info(f"{flops_per_token / 1e9:.3f} GFLOP per token for training (formula: "
                f"megatron_emo/training/flops.py); MFU against {peak or 'no known'} TFLOP/s peak")
    guard = NonFiniteGuard(run.train.nan_policy, run.train.max_nan_skips)
    spikes = SpikeDetector(run.train.spike_factor)
    routers = _routers(trainer)
    records = []
    stop = StopSignal()
    saver = CheckpointSaver(Path(run.train.output_dir) / "checkpoints", run=run,
                            tokenizer_file=data.tokenizer.model_file, asynchronous=run.train.async_save,
                            on_published=lambda path, seconds: writer.info(f"saved {path} in {seconds:.1f} s"))

    def save(done: int) -> None:
        saver.save(done, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)

    # A progress bar with ETA on an interactive terminal; plain log lines in batch jobs.
    progress = tqdm(total=run.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not (runtime.is_logging_rank and sys.stderr.isatty()))
    try:
        for step in range(start_step, run.train.steps):
            progress.update(1)
            saver.poll()
            started = time.perf_counter()
            lr = trainer.optimizer.param_groups[0]["lr"]
            result = trainer.train_step(functools.partial(microbatches, data.train, run, runtime, step, documents_of))
            if result.applied:
                guard.good_step()
                spikes.observe(step + 1, result.loss)
            else:
                try:
                    guard.bad_step(step, result.loss, result.grad_norm, trainer.model)
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
                record = _step_record(done, result, lr, elapsed, run, runtime, flops_per_token, peak)
                record.update(_router_summary([router.metrics.read() for router in routers]))
                records.append(record)
                writer.write(record)
            if data.validation and (done % run.train.eval_interval == 0 or done == run.train.steps):
                results = evaluate(trainer.chunks, config, data.validation, run=run,
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
    return records


def _step_record(done: int, result: StepResult, lr: float, elapsed: float, run: RunConfig, runtime: Runtime,
                 flops_per_token: float, peak: float | None) -> dict:
    tokens_per_s = run.data.global_batch_size * run.data.seq_length / elapsed
    record = {"step": done, "loss": result.loss, "grad_norm": result.grad_norm, "lr": lr,
              "tokens_per_s": tokens_per_s, "step_time_s": elapsed,
              "tflops_per_gpu": flops_per_token * tokens_per_s / runtime.world_size / 1e12}
    if peak is not None:
        record["mfu"] = record["tflops_per_gpu"] / peak
    if runtime.on_gpu:
        record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


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
