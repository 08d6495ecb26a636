"""Checkpoint save and load times of a recipe's model, as the trainer writes them.

    python tools/benchmark_checkpoint.py --recipe proxy_1gpu --output benchmarks/results/DATE_h100_checkpoint.json

Builds the recipe's model with the trainer's optimizer (megatron-core's distributed optimizer on
GPU, AdamW on CPU), takes one optimizer step so that every moment exists, then times the
trainer's saves (megatron-core sharded write, flush, SHA-256 manifest, atomic publish) and loads
(verify, read the pieces into the model and optimizer) --repeats times into --directory, and
writes one JSON record with the sizes and times. With --async-save (GPU) a save is timed twice:
until training could go on (``save_s``) and until the checkpoint is published (``publish_s``).
"""

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()

import torch  # noqa: E402

from megatron_emo.benchmark.cases import CASES, init_weights  # noqa: E402
from megatron_emo.checkpoint.store import CheckpointSaver, find_latest, load_checkpoint  # noqa: E402
from megatron_emo.config import ConfigError  # noqa: E402
from megatron_emo.recipes import resolve_run  # noqa: E402
from megatron_emo.training.cpu_mode import megatron_device  # noqa: E402
from megatron_emo.training.distributed import init_model_parallel, init_process_group, shutdown_distributed  # noqa: E402
from megatron_emo.training.metrics import run_info  # noqa: E402
from megatron_emo.training.step import BatchShape, build_trainer  # noqa: E402
from megatron_emo.validate import validate_run  # noqa: E402

EXIT_BAD_INPUT = 2


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="proxy_1gpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--vocab-size", type=int, default=100_352, help="padded vocabulary of the model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--async-save", action="store_true", help="save in the background (GPU only)")
    parser.add_argument("--directory", type=Path, default=None,
                        help="where checkpoints are written (default: a temporary folder, removed after)")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.async_save and not torch.cuda.is_available():
        parser.error("--async-save needs a GPU")
    return args


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(run, vocab_size: int, directory: Path, repeats: int, async_save: bool) -> dict:
    on_gpu = torch.cuda.is_available()
    init_process_group()
    runtime = init_model_parallel(run.emo_config(vocab_size=vocab_size, eos_token_id=2, on_gpu=on_gpu),
                                  seed=run.train.seed)
    model, config = CASES["emo"].build(run, vocab_size, 2, on_gpu)
    init_weights(model, config.init_method_std)
    shape = BatchShape(run.data.seq_length, run.data.micro_batch_size, num_microbatches=1)
    trainer = build_trainer(model, config, run.optim, shape, total_steps=run.train.steps, device=runtime.device)
    trainer.update()  # every optimizer moment exists from here on (the gradients are zero)
    gpt_model, optimizer, scheduler = model, trainer.optimizer, trainer.scheduler
    saver = CheckpointSaver(directory, run=run, asynchronous=async_save)
    saves, publishes, loads = [], [], []
    for repeat in range(repeats):
        if runtime.on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        saver.save(repeat + 1, model=gpt_model, optimizer=optimizer, scheduler=scheduler)
        saves.append(time.perf_counter() - started)
        saver.wait()
        publishes.append(time.perf_counter() - started)
        path = find_latest(directory)
        started = time.perf_counter()
        load_checkpoint(path, model=gpt_model, optimizer=optimizer, scheduler=scheduler)
        if runtime.on_gpu:
            torch.cuda.synchronize()
        loads.append(time.perf_counter() - started)
        print(f"[{repeat + 1}/{repeats}] save {saves[-1]:.1f} s, published after {publishes[-1]:.1f} s, "
              f"load {loads[-1]:.1f} s", flush=True)
    saver.close()
    size = _bytes(path)
    return {
        "parameters": sum(p.numel() for p in gpt_model.parameters()),
        "checkpoint_bytes": size,
        "files": {p.name: p.stat().st_size for p in sorted(path.iterdir())},
        "async_save": async_save,
        "save_s": saves,
        "publish_s": publishes,
        "load_s": loads,
        "save_gb_per_s": size / min(publishes) / 1e9,
        "load_gb_per_s": size / min(loads) / 1e9,
        "device": torch.cuda.get_device_name() if runtime.on_gpu else "cpu",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        run = resolve_run(args.recipe, args.overrides)
        validate_run(run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    directory = args.directory or Path(tempfile.mkdtemp(prefix="emo_ckpt_bench_"))
    try:
        with megatron_device():
            result = measure(run, args.vocab_size, directory, args.repeats, args.async_save)
    finally:
        shutdown_distributed()
        if args.directory is None:
            shutil.rmtree(directory, ignore_errors=True)
    record = {"recipe": args.recipe, "overrides": args.overrides, "date": datetime.date.today().isoformat(),
              **run_info(), **result}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"{result['parameters'] / 1e9:.2f}B parameters, checkpoint {result['checkpoint_bytes'] / 1e9:.1f} GB: "
          f"save {min(result['save_s']):.1f} s, published after {min(result['publish_s']):.1f} s "
          f"({result['save_gb_per_s']:.2f} GB/s), "
          f"load {min(result['load_s']):.1f} s ({result['load_gb_per_s']:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
