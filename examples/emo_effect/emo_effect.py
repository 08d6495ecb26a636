"""EMO against a standard MoE: train both, prune each to a domain's experts, compare perplexity.

    python examples/emo_effect/emo_effect.py --output-dir runs/emo_effect                 # CPU, minutes
    python examples/emo_effect/emo_effect.py --output-dir runs/emo_effect_gpu --scale gpu   # one GPU
    python examples/emo_effect/emo_effect.py --output-dir out --data data/web --data data/code \\
        --tokenizer-model tok.model --set model.emo_pool_min=2

1. Trains an EMO model and its standard-MoE twin (``model.emo_router_mode=topk``): the same
   recipe, parameters, seed and tokens (``python -m megatron_emo.train``), on the demo corpus or
   on the ``--data`` prefixes (one domain each, equal weights); then exports both to Hugging
   Face folders (tools/convert_to_hf.py).
2. For every domain and fraction (50%, 25%, 12.5% of the routed experts), selects the experts
   as tools/select_experts.py does (EMO's ``usage`` method: layerwise greedy by router
   probability, calibrated on the domain's training documents) and measures the perplexity of
   the model restricted to them on the domain's held-out documents (the validation split,
   ``--split``), which equals the pruned folder's perplexity (tested in tests/convert/test_prune.py).
3. Analyses which experts each model uses per domain (megatron_emo.analysis: top-25% share,
   mutual information, distinct experts per document, heat maps).
4. With ``--set train.eval_interval=N``, the gap curve: both models' validation perplexity per
   domain (no pool) every N steps of training, read from their ``eval.jsonl``.

Writes under ``--output-dir``: ``emo/`` and ``topk/`` (run, ``hf/``, ``experts.json``,
``experts.png``), ``emo_effect.json`` (settings, commands, every measurement, the targets),
``pruning.png`` (perplexity increase vs share of experts kept), ``results.md`` (the tables) and,
with evaluations during training, ``curve.png`` (EMO's perplexity gap to the standard MoE by step).
A model already trained in ``--output-dir`` is reused (the trainer resumes from its final
checkpoint): give a new ``--output-dir`` for other settings.
The HF models run with no document pool, as EMO's released models do.
"""

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MODES = {"emo": "EMO", "topk": "standard MoE"}
FRACTIONS = (0.5, 0.25, 0.125)

SCALES = {
    # The tiny recipe (4 layers, d 128, 16+1 experts of 64, top-2 routed + 1 shared, pools 4..16,
    # 256-token rows, 200 steps of 16 rows): minutes per model on 2 CPU cores, where the stock
    # HF model's forward (one row at a time) bounds how much text selection and evaluation read.
    "cpu": dict(overrides=(), calibration_tokens=4096, eval_tokens=8192, seq_length=256),
    # One GPU, about a minute of training per model: 8 layers, d 512, 64+1 experts of 256, top-4
    # routed + 1 shared, pools 8..64 (EMO's 1/16..1/2 of the experts), 1024-token rows, 300
    # steps of 16 rows (4.9M tokens, about 9 passes over the demo corpus's training share).
    "gpu": dict(overrides=(
        "model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
        "model.ffn_hidden_size=1024", "model.num_moe_experts=65", "model.moe_router_topk=5",
        "model.moe_ffn_hidden_size=256", "model.emo_pool_min=8", "model.emo_pool_max=64", "model.emo_eval_pool=16",
        "data.seq_length=1024", "data.micro_batch_size=16", "data.global_batch_size=16",
        "train.steps=300", "optim.warmup_steps=30",
    ), calibration_tokens=20_000, eval_tokens=50_000, seq_length=1024),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="everything is written under this folder")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--data", action="append", default=[], metavar="PREFIX",
                        help="an indexed dataset (one domain, named by the prefix's last part); repeatable; "
                        "default: the demo corpus")
    parser.add_argument("--tokenizer-model", help="the SentencePiece model of the --data datasets")
    parser.add_argument("--split", default="90,10,0",
                        help="train/validation/test shares of every domain's documents (default 90,10,0)")
    parser.add_argument("--calibration-tokens", type=int,
                        help="training-document tokens per domain that select the experts (default: the scale's)")
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens per domain at most (default: the scale's)")
    parser.add_argument("--concurrent", action="store_true",
                        help="train both models at the same time (for one GPU: the gpu scale's small models "
                        "leave most of it idle)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a training setting for both models (after the scale's); repeatable")
    args = parser.parse_args(argv)
    if args.data and not args.tokenizer_model:
        parser.error("--data needs --tokenizer-model")
    return args


# ---- data: each domain's documents, split as training splits them --------------------------

def domains(args, output: Path) -> tuple[dict[str, str], dict]:
    """``{domain: prefix}`` and the data settings for training."""
    if args.data:
        return {Path(p).name: p for p in args.data}, {"tokenizer_model": args.tokenizer_model}
    from megatron_emo.data.demo_data import prepare_demo_data

    manifest = prepare_demo_data(output / "cache" / "demo", progress=False)
    return {name: entry["prefix"] for name, entry in manifest["domains"].items()}, {}


def split_documents(prefix: str, split: str) -> tuple[list[list[int]], list[list[int]]]:
    """A dataset's documents (token ids, EOS included) as (training, validation) lists, by the
    same document ranges megatron-core's split gives training and its validation."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    ranges = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    parts = []
    for bounds in ranges[:2]:
        begin, end = (int(round(b * len(dataset))) for b in bounds) if bounds else (0, 0)
        parts.append([dataset[i].tolist() for i in range(begin, end)])
    return parts[0], parts[1]


def rows(documents: list[list[int]], seq_length: int, max_tokens: int) -> list[list[torch.Tensor]]:
    """Up to ``max_tokens`` tokens of whole documents, as each document's rows; the documents in
    a seeded random order, so that a small budget still samples the whole domain."""
    from megatron_emo.analysis.usage import document_rows

    out, total = [], 0
    for ids in random.Random(0).sample(documents, len(documents)):
        if total >= max_tokens:
            break
        out.append(document_rows(ids[:max_tokens - total], seq_length))
        total += len(ids)
    return [doc for doc in out if doc]


# ---- training and export ---------------------------------------------------------------------

def run_commands(commands: list[tuple[list[str], Path]]) -> None:
    """Run steps of the pipeline side by side, each ``(command, log)`` with its output to its
    log; once all have ended, stop with the tails of those that failed."""
    started = time.time()
    running = []
    for cmd, log in commands:
        print("$", " ".join(cmd), flush=True)
        with open(log, "w") as f:
            running.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT), log))
    failed = [(process.wait(), log) for process, log in running]
    failed = [(code, log) for code, log in failed if code != 0]
    if failed:
        sys.exit("\n".join(f"failed ({code}): see {log}\n{log.read_text()[-3000:]}" for code, log in failed))
    print(f"  done in {time.time() - started:.0f} s", flush=True)


def pipeline(mode: str, prefixes: dict, data: dict, args, output: Path) -> dict:
    """The commands that train ``mode`` and export it: ``{"train", "export"}``, each
    ``(command, log)``."""
    run_dir = output / mode
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = [
        *SCALES[args.scale]["overrides"],
        f"model.emo_router_mode={mode!r}", f"data.split={args.split!r}",
        # A cache per model: trainers running side by side never write the same index files.
        f"data.cache_dir={str(output / 'cache' / mode)!r}", f"train.output_dir={str(run_dir)!r}",
        "train.eval_interval=0", "train.tensorboard=False", "train.save_interval=1000000", "train.keep_last=1",
        *args.overrides,
    ]
    if args.data:
        blend = [[1.0, prefix] for prefix in prefixes.values()]
        settings += [f"data.blend={blend!r}", f"data.tokenizer_model={data['tokenizer_model']!r}"]
    train = [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny"]
    for setting in settings:
        train += ["--set", setting]
    export = [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint", str(run_dir),
              "--output", str(run_dir / "hf"), "--force", "--dtype", "float32"]
    return {"train": (train, run_dir / "train.log"), "export": (export, run_dir / "export.log")}


# ---- pruning and evaluation ------------------------------------------------------------------

def measure(hf_dir: Path, calibration: dict, held_out: dict, device: str) -> dict:
    """Full and pruned perplexity per domain, the kept experts, and the usage analysis."""
    from transformers import AutoModelForCausalLM

    from megatron_emo.analysis.heatmap import plot_heatmaps
    from megatron_emo.analysis.specialisation import summarise
    from megatron_emo.analysis.usage import collect_usage
    from megatron_emo.convert.prune import perplexity, restricted_routing, select_experts

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    num_experts = model.config.num_experts
    result = {"num_routed_experts": num_experts, "full": {}, "pruned": []}
    # The pruning library creates its tensors with factory defaults: make them the model's device.
    with torch.device(device):
        for domain in held_out:
            calib = [row.to(device) for doc in calibration[domain] for row in doc]
            evaluation = [row.to(device) for doc in held_out[domain] for row in doc]
            full, tokens = perplexity(model, evaluation)
            result["full"][domain] = {"perplexity": full, "tokens": tokens}
            for fraction in FRACTIONS:
                keep = max(model.config.num_experts_per_tok, round(fraction * num_experts))
                kept = select_experts(model, calib, keep, "usage")
                with restricted_routing(model, dict(enumerate(kept))):
                    pruned, _ = perplexity(model, evaluation)
                result["pruned"].append({"domain": domain, "fraction": fraction, "kept": keep,
                                         "perplexity": pruned, "increase_pct": 100 * (pruned / full - 1),
                                         "experts_kept_per_layer": kept})
        usage = collect_usage(model, calibration)
    result["analysis"] = summarise(usage, 0.25)
    (hf_dir.parent / "experts.json").write_text(json.dumps(result["analysis"], indent=1) + "\n")
    plot_heatmaps(usage, hf_dir.parent / "experts.png", title=f"{hf_dir.parent.name}: expert use by domain")
    return result


def mean_increase(result: dict, fraction: float) -> float:
    values = [r["increase_pct"] for r in result["pruned"] if r["fraction"] == fraction]
    return sum(values) / len(values)


def targets(results: dict) -> dict:
    """The claims checked: at 25% of the experts EMO loses at most half of what the standard MoE
    loses; whole, EMO's perplexity is within 2% of the standard MoE's (mean over domains)."""
    emo, std = results["emo"], results["topk"]
    ratio = [emo["full"][d]["perplexity"] / std["full"][d]["perplexity"] for d in emo["full"]]
    full_gap = 100 * (sum(ratio) / len(ratio) - 1)
    emo25, std25 = mean_increase(emo, 0.25), mean_increase(std, 0.25)
    return {"emo_increase_at_25pct": emo25, "standard_increase_at_25pct": std25,
            "at_25pct_emo_at_most_half": emo25 <= 0.5 * std25,
            "full_perplexity_gap_pct": full_gap, "full_within_2pct": abs(full_gap) <= 2.0}


def gap_curve(output: Path) -> list[dict]:
    """Per evaluation step of both runs: each domain's validation perplexity with no pool for
    EMO and the standard MoE, and EMO's gap in percent (empty without evaluations)."""
    evaluations = {}
    for mode in MODES:
        path = output / mode / "eval.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        evaluations[mode] = {record["step"]: record for record in map(json.loads, lines)}
    curve = []
    for step in sorted(set(evaluations["emo"]) & set(evaluations["topk"])):
        emo, std = evaluations["emo"][step], evaluations["topk"][step]
        domains = {}
        for key in sorted(emo):
            if key.startswith("eval/") and key.endswith("/no_pool") and key in std:
                emo_ppl, std_ppl = math.exp(emo[key]), math.exp(std[key])
                domains[key.split("/")[1]] = {"emo": emo_ppl, "topk": std_ppl, "gap_pct": 100 * (emo_ppl / std_ppl - 1)}
        gaps = [d["gap_pct"] for d in domains.values()]
        curve.append({"step": step, "domains": domains, "mean_gap_pct": sum(gaps) / len(gaps)})
    return curve


# ---- report ----------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for mode, colour in zip(MODES, ("tab:blue", "tab:red")):
        result = results[mode]
        for domain in result["full"]:
            points = [r["increase_pct"] for f in FRACTIONS for r in result["pruned"]
                      if r["fraction"] == f and r["domain"] == domain]
            ax.plot(FRACTIONS, points, color=colour, alpha=0.3, linewidth=1)
        ax.plot(FRACTIONS, [mean_increase(result, f) for f in FRACTIONS], color=colour, marker="o",
                linewidth=2, label=f"{MODES[mode]} (mean over domains)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(FRACTIONS, [f"{100 * f:g}%" for f in FRACTIONS])
    ax.invert_xaxis()
    ax.set_xlabel("routed experts kept for the domain")
    ax.set_ylabel("perplexity increase on held-out text (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=120)


def plot_curve(curve: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    steps = [point["step"] for point in curve]
    for domain in curve[-1]["domains"]:
        ax.plot(steps, [point["domains"][domain]["gap_pct"] for point in curve], alpha=0.4, linewidth=1,
                label=domain)
    ax.plot(steps, [point["mean_gap_pct"] for point in curve], color="black", marker="o", linewidth=2,
            label="mean over domains")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("EMO perplexity vs standard MoE (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.savefig(path, dpi=120)


def curve_table(curve: list[dict]) -> str:
    domains = list(curve[-1]["domains"])
    lines = ["| step | " + " | ".join(f"{d}: EMO / standard (gap)" for d in domains) + " | mean gap |",
             "|" + " --- |" * (2 + len(domains))]
    for point in curve:
        cells = [f"{point['domains'][d]['emo']:.1f} / {point['domains'][d]['topk']:.1f} "
                 f"({point['domains'][d]['gap_pct']:+.1f}%)" for d in domains]
        lines.append(f"| {point['step']} | " + " | ".join(cells) + f" | {point['mean_gap_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def table(results: dict) -> str:
    header = "| model | domain | full | " + " | ".join(f"{100 * f:g}% of experts" for f in FRACTIONS) + " |"
    lines = [header, "|" + " --- |" * (3 + len(FRACTIONS))]
    for mode, name in MODES.items():
        result = results[mode]
        for domain, full in result["full"].items():
            cells = [f"{r['perplexity']:.1f} ({r['increase_pct']:+.1f}%)" for f in FRACTIONS for r in result["pruned"]
                     if r["fraction"] == f and r["domain"] == domain]
            lines.append(f"| {name} | {domain} | {full['perplexity']:.1f} | " + " | ".join(cells) + " |")
        means = " | ".join(f"{mean_increase(result, f):+.1f}%" for f in FRACTIONS)
        lines.append(f"| {name} | **mean increase** | | {means} |")
    lines += ["", "| model | top-25% share (code / docs / prose…) | mutual information domain;expert | "
              "distinct experts per document |", "| --- | --- | --- | --- |"]
    for mode, name in MODES.items():
        analysis = results[mode]["analysis"]
        shares = " / ".join(f"{v:.2f}" for v in analysis["top_share_mean"].values())
        distinct = " / ".join(f"{v:.1f}" for v in analysis["distinct_experts_per_document_mean"].values())
        lines.append(f"| {name} | {shares} | {analysis['mutual_information_bits_mean']:.3f} of "
                     f"{analysis['mutual_information_max_bits']:.3f} bits | {distinct} of "
                     f"{analysis['num_routed_experts']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    scale = {**SCALES[args.scale]}
    for key in ("calibration_tokens", "eval_tokens"):
        scale[key] = getattr(args, key) or scale[key]
    started = time.time()
    prefixes, data = domains(args, output)
    calibration, held_out = {}, {}
    for domain, prefix in prefixes.items():
        train_docs, valid_docs = split_documents(prefix, args.split)
        calibration[domain] = rows(train_docs, scale["seq_length"], scale["calibration_tokens"])
        held_out[domain] = rows(valid_docs, scale["seq_length"], scale["eval_tokens"])
        if not held_out[domain]:
            sys.exit(f"domain {domain}: --split {args.split} leaves no held-out documents")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = {mode: pipeline(mode, prefixes, data, args, output) for mode in MODES}
    commands = [" ".join(job[step][0]) for job in jobs.values() for step in ("train", "export")]
    if args.concurrent:
        run_commands([job["train"] for job in jobs.values()])
    results = {}
    for mode, job in jobs.items():
        if not args.concurrent:
            run_commands([job["train"]])
        run_commands([job["export"]])
        evaluated = time.time()
        results[mode] = measure(output / mode / "hf", calibration, held_out, device)
        print(f"  {MODES[mode]}: pruning and evaluation in {time.time() - evaluated:.0f} s", flush=True)
    summary = {"scale": args.scale, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started),
               "argv": sys.argv[1:], "split": args.split, "fractions": FRACTIONS, "selection": "usage",
               "calibration_tokens_per_domain": scale["calibration_tokens"],
               "eval_tokens_per_domain_max": scale["eval_tokens"], "commands": commands,
               "targets": targets(results), "results": results, "curve": gap_curve(output)}
    (output / "emo_effect.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, output / "pruning.png")
    report = table(results)
    if summary["curve"]:
        plot_curve(summary["curve"], output / "curve.png")
        report += "\n" + curve_table(summary["curve"])
    (output / "results.md").write_text(report)
    print(report)
    print(json.dumps(summary["targets"], indent=1))
    print(f"wrote {output / 'emo_effect.json'}, {output / 'pruning.png'}, {output / 'results.md'} "
          f"in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
