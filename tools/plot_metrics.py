"""A PNG of a training run's main scalars, read from its TensorBoard events or metrics.jsonl.

    python tools/plot_metrics.py runs/tiny                                 # runs/tiny/metrics.png
    python tools/plot_metrics.py runs/tiny --source tensorboard --output docs/tiny_tensorboard.png
    python tools/plot_metrics.py runs/resumed --compare runs/uninterrupted --output resume.png

The grid holds the LM loss, learning rate, gradient norm, tokens/s, LB loss, z-loss, pool size,
and per MoE layer the expert load max/mean and the fraction of unused routed experts. With
--compare OTHER_RUN the figure overlays the two runs' LM-loss curves above their difference per
step; its title says whether the losses are identical at every common step, and a JSON next to
the PNG (same name, .json) holds both loss lists and the largest absolute difference.

Sources: ``metrics.jsonl`` holds the values as logged (float64); TensorBoard events hold them
as float32, so comparisons should read the JSONL (``--source auto`` prefers it).

Exit codes: 0 done; 2 bad input (no such run, nothing logged) or matplotlib not installed.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: main first checks that matplotlib is installed
    from matplotlib.figure import Figure

from megatron_emo.analysis.extras import exit_unless_installed
from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()

from megatron_emo.training.metrics import scalars  # noqa: E402  (imports megatron-core)

EXIT_BAD_INPUT = 2

PANELS = (
    ("train/loss", "LM loss"),
    ("train/lr", "learning rate"),
    ("train/grad_norm", "gradient norm"),
    ("train/tokens_per_s", "tokens/s"),
    ("train/lb_loss", "LB loss (mean over layers)"),
    ("train/z_loss", "router z-loss (mean over layers)"),
    ("train/pool_experts", "pool size, experts (mean over layers)"),
    ("router/load_max_over_mean", "expert load max/mean"),
    ("router/unused_experts", "unused routed experts (fraction)"),
)
"""(tag, title) of each panel; a ``router/`` tag is per layer, one line per layer."""


class BadInput(Exception):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run's train.output_dir")
    parser.add_argument("--output", type=Path, help="PNG to write (default: RUN_DIR/metrics.png, "
                        "or RUN_DIR/loss_vs_<OTHER>.png with --compare)")
    parser.add_argument("--compare", type=Path, metavar="OTHER_RUN", help="overlay this run's LM loss")
    parser.add_argument("--source", choices=("auto", "jsonl", "tensorboard"), default="auto",
                        help="auto: metrics.jsonl if the run has one, else its TensorBoard events")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def read_jsonl(path: Path) -> dict[str, dict[int, float]]:
    """``tag → {step: value}`` from metrics.jsonl, under the TensorBoard tags."""
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            series.setdefault(tag, {})[record["step"]] = value
    return series


def read_tensorboard(path: Path) -> dict[str, dict[int, float]]:
    """``tag → {step: value}`` from a run's TensorBoard folder (all event files; steps a resumed
    run purged are dropped by the accumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every point
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def load_run(run_dir: Path, source: str) -> dict[str, dict[int, float]]:
    """The run's scalars from ``source`` (``auto``, ``jsonl`` or ``tensorboard``)."""
    jsonl, tensorboard = run_dir / "metrics.jsonl", run_dir / "tensorboard"
    if source == "auto":
        source = "jsonl" if jsonl.is_file() else "tensorboard"
    if source == "jsonl" and jsonl.is_file():
        series = read_jsonl(jsonl)
    elif source == "tensorboard" and tensorboard.is_dir():
        series = read_tensorboard(tensorboard)
    else:
        raise BadInput(f"{run_dir} has no {'metrics.jsonl' if source == 'jsonl' else 'tensorboard/ folder'}")
    if "train/loss" not in series:
        raise BadInput(f"{run_dir}: no step was logged ({source})")
    return series


def _layer_series(series: dict, prefix: str) -> list[tuple[int, dict[int, float]]]:
    """``(layer, {step: value})`` of the ``prefix/layer<n>`` tags, in layer order."""
    layers = [(int(tag.rsplit("layer", 1)[1]), values) for tag, values in series.items()
              if tag.startswith(prefix + "/layer")]
    return sorted(layers, key=lambda item: item[0])


def _plot(ax, values: dict[int, float], **style) -> None:
    steps = sorted(values)
    ax.plot(steps, [values[s] for s in steps], **style)


def plot_grid(series: dict, title: str) -> "Figure":
    """A 3-column grid with one panel per entry of :data:`PANELS`."""
    from matplotlib.figure import Figure

    rows = math.ceil(len(PANELS) / 3)
    fig = Figure(figsize=(15, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False).flatten()
    for ax, (tag, panel_title) in zip(axes, PANELS):
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        if tag.startswith("router/"):
            for layer, values in _layer_series(series, tag):
                _plot(ax, values, label=f"layer {layer}", marker=".")
            if ax.lines:
                ax.legend(fontsize="small")
        elif tag in series:
            _plot(ax, series[tag], marker=".")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def compare_losses(a: dict[int, float], b: dict[int, float]) -> dict:
    """Loss curves of two runs and their largest absolute difference over the common steps."""
    common = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in common]
    return {
        "common_steps": common,
        "max_abs_difference": max(diffs) if diffs else None,
        # Identical: the same logged steps and bit-equal losses at each of them.
        "identical": bool(common) and set(a) == set(b) and max(diffs) == 0.0,
    }


def plot_comparison(label_a: str, a: dict[int, float], label_b: str, b: dict[int, float],
                    result: dict) -> "Figure":
    """Both loss curves on top, ``|a - b|`` per common step below."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    _plot(top, a, label=label_a, linewidth=2.5, alpha=0.6)
    _plot(top, b, label=label_b, linestyle="--", marker=".")
    top.set_ylabel("LM loss")
    top.legend()
    common = result["common_steps"]
    bottom.plot(common, [abs(a[s] - b[s]) for s in common], marker=".")
    bottom.set_ylabel(f"|{label_a} - {label_b}|")
    bottom.set_xlabel("step")
    n, worst = len(common), result["max_abs_difference"]
    if not common:
        verdict = "no common logged step"
    elif result["identical"]:
        verdict = f"LM losses identical at all {n} logged steps (max |difference| = 0)"
    else:
        verdict = f"LM losses differ: max |difference| = {worst:.3g} over {n} common steps"
    fig.suptitle(f"{label_a} vs {label_b}: {verdict}")
    return fig


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    exit_unless_installed("analysis", "matplotlib")
    try:
        series = load_run(args.run_dir, args.source)
        if args.compare is None:
            output = args.output or args.run_dir / "metrics.png"
            plot_grid(series, f"{args.run_dir} ({args.source})").savefig(output, dpi=110)
            print(f"wrote {output}")
            return 0
        other = load_run(args.compare, args.source)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    label_a, label_b = args.run_dir.name, args.compare.name
    if label_a == label_b:  # e.g. runs/x/run vs runs/y/run: the labels must tell them apart
        label_a, label_b = str(args.run_dir), str(args.compare)
    a, b = series["train/loss"], other["train/loss"]
    result = compare_losses(a, b)
    output = args.output or args.run_dir / f"loss_vs_{args.compare.name}.png"
    plot_comparison(label_a, a, label_b, b, result).savefig(output, dpi=110)
    report = {
        "runs": {label: {"dir": str(path), "steps": sorted(loss), "loss": [loss[s] for s in sorted(loss)]}
                 for label, path, loss in ((label_a, args.run_dir, a), (label_b, args.compare, b))},
        "common_steps": len(result["common_steps"]),
        "max_abs_difference": result["max_abs_difference"],
        "identical": result["identical"],
    }
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output} and {output.with_suffix('.json')}: identical={result['identical']}, "
          f"max |difference| {result['max_abs_difference']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
