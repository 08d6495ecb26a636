"""One benchmark case: build, train W warm-up and N timed steps, then the time breakdown (and
on the GPU one profiled step for the GPU's idle time).

A step is the trainer's (megatron_emo.training.step): megatron-core's forward/backward schedule
over the step's micro-batches, the loss reduced on the host, megatron-core's distributed
optimizer and the schedule. Throughput counts the timed steps only, from a synchronised start to
a synchronised end.
"""

import contextlib
import functools
import gc
import logging
import statistics
import time
import traceback

import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from megatron_emo import logs
from megatron_emo.benchmark.cases import Case, init_weights
from megatron_emo.benchmark.memory_bound import copy_bandwidth, optimizer_memory_bound_ms
from megatron_emo.benchmark.timeline import Timeline, gpu_time, instrument
from megatron_emo.model.document_batch import document_batcher
from megatron_emo.recipes import RunConfig
from megatron_emo.training.distributed import Runtime
from megatron_emo.training.flops import forward_flops_per_token, peak_tflops
from megatron_emo.training.loop import microbatches
from megatron_emo.training.step import BatchShape, build_trainer


class _PathLog(logging.Handler):
    """Collects the kernel paths the package logs (``<op>: path = <path>``)."""

    def __init__(self):
        super().__init__()
        self.paths = {}

    def emit(self, record):
        op, sep, path = record.getMessage().partition("path = ")
        if sep:
            self.paths[op.rstrip(" :")] = path


def _sync(runtime: Runtime) -> None:
    if runtime.on_gpu:
        torch.cuda.synchronize()


def _error(name: str, error: Exception) -> dict:
    return {f"{name}_error": f"{type(error).__name__}: {error}", f"{name}_traceback": traceback.format_exc()}


def _measure(case: Case, run: RunConfig, runtime: Runtime, dataset, *, vocab_size: int, eos_id: int,
             warmup: int, steps: int, profile_steps: int, trace_host: bool, progress) -> dict:
    model, config = case.build(run, vocab_size, eos_id, runtime.on_gpu)
    num_params = sum(p.numel() for p in model.parameters())
    init_weights(model, config.init_method_std)  # where megatron-core allocated it: on the GPU there
    data = run.data
    shape = BatchShape(data.seq_length, data.micro_batch_size,
                       data.global_batch_size // (data.micro_batch_size * runtime.data_parallel_size))
    trainer = build_trainer(model, config, run.optim, shape, total_steps=run.train.steps, device=runtime.device)
    progress(f"built: {num_params / 1e9:.3f}B parameters")
    documents_of = document_batcher(config, eos_id)
    losses = []

    def train_step(step: int, timeline: Timeline | None = None) -> None:
        batches = functools.partial(microbatches, dataset, run, runtime, step, documents_of)
        result = trainer.train_step(batches, functools.partial(timeline.span, "optimizer") if timeline
                                    else contextlib.nullcontext)
        losses.append(result.loss)

    with case.patch():
        for step in range(warmup):
            started = time.perf_counter()
            train_step(step)
            _sync(runtime)
            progress(f"warm-up step {step + 1}/{warmup}: {time.perf_counter() - started:.2f} s")
        step_times = []
        _sync(runtime)
        first = time.perf_counter()
        for step in range(warmup, warmup + steps):
            started = time.perf_counter()
            train_step(step)
            _sync(runtime)
            step_times.append(time.perf_counter() - started)
        elapsed = time.perf_counter() - first
        progress(f"{steps} timed steps: {elapsed:.2f} s")
        result = {"num_params": num_params, "step_times_s": step_times, "timed_s": elapsed,
                  "losses": losses[:], "flops": flop_count(config, run, vocab_size)}
        last = warmup + steps + profile_steps - 1
        try:
            timeline = Timeline(runtime.on_gpu)
            with instrument(trainer.chunks, timeline):
                for step in range(warmup + steps, last + 1):
                    with timeline.step():
                        train_step(step, timeline)
            if profile_steps:
                result["breakdown_ms"] = timeline.milliseconds_per_step()
                result["breakdown_step_ms"] = timeline.step_milliseconds()
        except Exception as error:  # the throughput stands without the breakdown
            result.update(_error("breakdown", error))
        if profile_steps and runtime.on_gpu:
            try:
                # Hooked as the breakdown's steps (their marks dropped), on the last one's batch:
                # the data holds no more steps.
                with instrument(trainer.chunks, Timeline(on_gpu=True)):
                    result.update(gpu_time(functools.partial(train_step, last), trace_host=trace_host))
            except Exception as error:
                result.update(_error("gpu_idle", error))
    if runtime.on_gpu:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        bandwidth = copy_bandwidth(runtime.device)
        result["copy_bandwidth_gb_s"] = bandwidth / 1e9
        # The distributed optimizer's shard of this rank's parameters (exact on one GPU; expert
        # parameters are sharded over the expert-data-parallel group, which this ignores).
        shard = num_params // runtime.data_parallel_size
        result["optimizer_memory_bound_ms"] = optimizer_memory_bound_ms(shard, bandwidth)
    return result


def run_case(case: Case, run: RunConfig, runtime: Runtime, dataset, *, vocab_size: int, eos_id: int,
             warmup: int, steps: int, profile_steps: int, trace_host: bool = False, progress=print) -> dict:
    """Benchmark one case; failures are recorded, not raised (``trace_host``: see
    :func:`megatron_emo.benchmark.timeline.gpu_time`).

    Returns:
        the case's record: ``status`` (``ok`` or ``failed``, with the error), and for ``ok`` the
        throughput (``tokens_per_s_per_gpu``, ``tflops_per_gpu``, ``mfu``), FLOPs, memory,
        step times, the per-component breakdown (``breakdown_ms``, adding up to
        ``breakdown_step_ms``; on the GPU ``gpu_busy_ms`` and ``gpu_idle_ms`` apart) and the
        kernel paths that ran.
    """
    record = {"case": case.name, "description": case.description, **case.info}
    # Kernel paths are logged once per process: forget them so this case logs its own.
    logs._logged_once.clear()
    path_log = _PathLog()
    logging.getLogger("megatron_emo").addHandler(path_log)
    if runtime.on_gpu:
        torch.cuda.reset_peak_memory_stats()
    failure = None
    try:
        result = _measure(case, run, runtime, dataset, vocab_size=vocab_size, eos_id=eos_id, warmup=warmup,
                          steps=steps, profile_steps=profile_steps, trace_host=trace_host, progress=progress)
    except Exception as error:
        failure = {"status": "failed", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    finally:
        logging.getLogger("megatron_emo").removeHandler(path_log)
        clear_aux_losses_tracker()
    # Out of the except clause, whose traceback would keep the failed case's model alive.
    gc.collect()
    if runtime.on_gpu:
        torch.cuda.empty_cache()
    if failure:
        return {**record, **failure}
    return {**record, "status": "ok", "kernel_paths": path_log.paths, **throughput(result, run, runtime)}


def flop_count(config, run: RunConfig, vocab_size: int) -> dict:
    """Training FLOPs per token of the model (full and causal attention scores), with the
    forward by component and the formula's name."""
    data = run.data
    forward = forward_flops_per_token(config, seq_length=data.seq_length, vocab_size=vocab_size)
    causal = forward_flops_per_token(config, seq_length=data.seq_length, vocab_size=vocab_size, causal=True)
    return {
        "training_per_token": 3 * sum(forward.values()),
        "training_per_token_causal_attention": 3 * sum(causal.values()),
        "forward_per_token_by_component": forward,
        "formula": "3 x forward; see megatron_emo/training/flops.py; attention scores over the full s x s "
                   "(causal_attention: halved)",
    }


def throughput(result: dict, run: RunConfig, runtime: Runtime) -> dict:
    """Tokens/s/GPU, TFLOP/s/GPU and MFU of the timed steps."""
    data = run.data
    steps = len(result["step_times_s"])
    tokens_per_s = steps * data.global_batch_size * data.seq_length / result["timed_s"] / runtime.world_size
    per_token, per_token_causal = (result["flops"][key] for key in
                                   ("training_per_token", "training_per_token_causal_attention"))
    peak = peak_tflops(runtime.device)
    return {
        **result,
        "tokens_per_s_per_gpu": tokens_per_s,
        "step_time_median_s": statistics.median(result["step_times_s"]),
        "tflops_per_gpu": per_token * tokens_per_s / 1e12,
        "peak_tflops": peak,
        "mfu": per_token * tokens_per_s / 1e12 / peak if peak else None,
        "mfu_causal_attention": per_token_causal * tokens_per_s / 1e12 / peak if peak else None,
    }
