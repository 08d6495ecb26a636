"""Train an EMO model.

    python -m megatron_emo.train --recipe tiny                      # 2 CPU cores, minutes
    python -m megatron_emo.train --recipe tiny --set model.emo_router_mode=topk --set train.output_dir="'runs/topk'"
    torchrun --nproc-per-node 8 -m megatron_emo.train --recipe emo_1b14b \
        --set "data.blend=[[0.7,'data/web'],[0.3,'data/code']]" --set data.tokenizer_model="'tok.model'"

Recipes live in megatron_emo/recipes.py; ``--set section.field=value`` overrides any field of
the run (sections: model, data, gpt, optim, train). ``--print-config`` checks and shows the
resolved run; ``-v`` also shows megatron-core's own log lines and warnings.

A run's folder (``train.output_dir``) is resumed from its newest checkpoint that verifies; a
folder holding another run is refused with the way out named (megatron_emo/training/run_folder.py).

Exit codes: 0 finished, or stopped by SIGTERM/SIGUSR1 after saving a checkpoint; 2 bad input
(setting, data, tokenizer or checkpoint); 3 stopped on non-finite steps (checkpoint saved).
"""

import argparse
import dataclasses
import json
import sys

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()  # before megatron-core is imported below

from megatron_emo.checkpoint.store import CheckpointError  # noqa: E402
from megatron_emo.config import ConfigError  # noqa: E402  (imports megatron-core)
from megatron_emo.data.indexed import DatasetError  # noqa: E402
from megatron_emo.recipes import RECIPES, resolve_run  # noqa: E402
from megatron_emo.training.guards import NonFiniteStep  # noqa: E402
from megatron_emo.validate import validate_training_run  # noqa: E402

EXIT_BAD_INPUT = 2
"""A bad setting, dataset, tokenizer or checkpoint: nothing was trained."""
EXIT_NON_FINITE = 3
"""Stopped on non-finite losses or gradients, after saving the last good state."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--print-config", action="store_true", help="print the resolved run and exit")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        run = resolve_run(args.recipe, args.overrides)
        if args.print_config:  # shown even when it does not pass the checks below
            print(json.dumps(dataclasses.asdict(run), indent=2, default=str))
        validate_training_run(run)
        if args.print_config:
            return 0
        from megatron_emo.training.loop import train

        train(run)
    except (ConfigError, DatasetError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteStep as error:
        print(f"stopped: non-finite training step: {error}", file=sys.stderr)
        return EXIT_NON_FINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
