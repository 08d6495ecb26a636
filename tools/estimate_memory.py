"""Per-GPU memory of a recipe on a parallel layout: weights, gradients, optimizer states and
activations (without recomputation, selective, full), for every pipeline stage.

    python tools/estimate_memory.py --recipe emo_1b14b --world-size 8 --set model.expert_model_parallel_size=8 \\
        --set data.micro_batch_size=1
    python tools/estimate_memory.py --recipe emo_1b14b --world-size 64 --set model.tensor_model_parallel_size=2 \\
        --set model.sequence_parallel=True --set model.expert_model_parallel_size=8 --json

``--set`` takes the same overrides as ``python -m megatron_emo.train``. The formulas are in
megatron_emo/memory.py. A layout that cannot run, or does not fit GPUs of
``--gpu-memory-gib`` keeping ``--reserve-gib`` free (CUDA context, NCCL buffers, allocator
fragmentation), is refused with the reason.

Exit codes: 0 fits; 2 impossible layout or bad setting; 3 does not fit.
"""

import argparse
import json
import math
import sys

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()

from megatron_emo.config import ConfigError  # noqa: E402  (imports megatron-core)
from megatron_emo.data.indexed import DatasetError  # noqa: E402
from megatron_emo.memory import RECOMPUTE_SETTINGS, GiB, estimate_memory  # noqa: E402
from megatron_emo.recipes import RECIPES, resolve_run  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_DOES_NOT_FIT = 3


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def gib(text: str) -> float:
    """An argparse type: a finite, non-negative number of GiB."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of GiB, at least 0, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--world-size", type=positive_int, required=True, help="GPUs of the job")
    parser.add_argument("--vocab-size", type=positive_int,
                        help="the tokenizer's vocabulary (default: data.tokenizer_model's, else data.demo_vocab_size)")
    parser.add_argument("--gpu-memory-gib", type=gib, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--reserve-gib", type=gib, default=6.0,
                        help="kept free for the CUDA context, NCCL and fragmentation (default 6)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes) instead of a table")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.reserve_gib >= args.gpu_memory_gib:
        parser.error(f"--reserve-gib {args.reserve_gib:g} leaves nothing of --gpu-memory-gib {args.gpu_memory_gib:g}")
    return args


def tokenizer_vocab_size(run) -> int:
    """The vocabulary training would see: its tokenizer's, or the demo tokenizer's size."""
    if not run.data.tokenizer_model:
        return run.data.demo_vocab_size
    from megatron_emo.data.tokenizer import Tokenizer

    return Tokenizer(run.data.tokenizer_model).vocab_size


def table(estimate) -> str:
    layout, worst = estimate.layout, estimate.worst()
    columns = ["stage", "layers", "params B", "weights", "grads", "optimizer"]
    columns += [f"act {setting}" for setting in RECOMPUTE_SETTINGS] + [f"total ({estimate.recompute})"]
    rows = [
        [stage.stage, stage.layers, f"{stage.params / 1e9:.2f}"]
        + [f"{value / GiB:.1f}" for value in (stage.weights, stage.grads, stage.optimizer)]
        + [f"{stage.activations[setting] / GiB:.1f}" for setting in RECOMPUTE_SETTINGS]
        + [f"{stage.total(estimate.recompute) / GiB:.1f}"]
        for stage in estimate.stages
    ]
    widths = [len(column) for column in columns]
    return "\n".join([
        f"{estimate.recipe} on {layout.world_size} GPUs: {layout.describe()}",
        f"model: {estimate.model_params / 1e9:.2f} B parameters (+{estimate.padding_params / 1e9:.3f} B of "
        f"padding experts); one layer stores {sum(estimate.layer_activations.values()) / GiB:.2f} GiB of "
        "activations per micro-batch without recomputation",
        "GiB per GPU; activations: peak with each recompute setting",
        "  ".join(columns),
        *("  ".join(f"{value:>{width}}" for value, width in zip(row, widths)) for row in rows),
        f"peak: {worst.total(estimate.recompute) / GiB:.1f} GiB on stage {worst.stage}",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        run = resolve_run(args.recipe, args.overrides)
        vocab_size = args.vocab_size or tokenizer_vocab_size(run)
        estimate = estimate_memory(run, world_size=args.world_size, vocab_size=vocab_size)
    except (ConfigError, DatasetError, FileNotFoundError) as error:
        print(f"error: impossible layout or setting: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    refusal = estimate.refusal(int(args.gpu_memory_gib * GiB), int(args.reserve_gib * GiB))
    if args.json:
        print(json.dumps({**estimate.to_json(), "gpu_memory_gib": args.gpu_memory_gib,
                          "reserve_gib": args.reserve_gib, "fits": refusal is None, "refusal": refusal}, indent=2))
    else:
        print(table(estimate))
    if refusal:
        print(f"error: does not fit: {refusal}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    if not args.json:
        print(f"fits in {args.gpu_memory_gib:g} GiB GPUs with {args.reserve_gib:g} GiB kept free")
    return 0


if __name__ == "__main__":
    sys.exit(main())
