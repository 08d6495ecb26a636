"""End-to-end training throughput, several models side by side, with honest MFU.

    python tools/benchmark_throughput.py --recipe proxy_1gpu --output benchmarks/results

Trains the recipe for --warmup then --steps timed steps per case and reports tokens/s/GPU,
TFLOP/s/GPU and MFU (the FLOP formula and the GPU's peak are printed and stored), peak memory,
and where a step's time goes (embedding, rotary table, attention, norms, router, dispatch,
experts, shared expert, combine, LM head, loss, optimizer, other; from --profile-steps extra
steps with CUDA events at module boundaries; on a GPU also the GPU's idle time per step, from
one more step under torch.profiler). Cases:

- ``emo``: our full stack (document-pooled router, fused kernels where present);
- ``topk``: the same model with plain top-k routing (no pool): the cost of EMO;
- ``loop-router``: ``emo`` with a per-document Python-loop router in the style of the original
  EMO implementation (tools/loop_router.py);
- ``mcore-moe``: megatron-core's own MoE layer in the same GPTModel and attention (GPU only);
- ``dense``: a dense model with the same active FLOPs per token, the ceiling.

A case that fails is recorded with its error and the run goes on. Writes
``<date>_<device>_<recipe>_throughput.json`` (one record per case: results, device, versions,
git commit, recipe, layout; plus the targets) into --output after every case, so a run cut
short keeps the cases it finished, and a ``.png`` chart at the end. Data:
``synthetic`` (random tokens, --docs-per-row documents per sequence) or the recipe's own.
``--plot FILE.json`` redraws the chart of an earlier run.
"""

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

# Before torch starts CUDA: fewer fragmentation failures for the largest models.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings  # noqa: E402

quiet_megatron_warnings()

import torch  # noqa: E402
from loop_router import per_document_loop_route  # noqa: E402  (tools/, next to this file)

from megatron_emo.benchmark import report  # noqa: E402
from megatron_emo.benchmark.cases import CASES, Case, emo_model  # noqa: E402
from megatron_emo.benchmark.runner import run_case  # noqa: E402
from megatron_emo.benchmark.synthetic import SyntheticDocuments  # noqa: E402
from megatron_emo.config import ConfigError  # noqa: E402
from megatron_emo.data.gpt_data import build_train_dataset  # noqa: E402
from megatron_emo.data.indexed import DatasetError  # noqa: E402
from megatron_emo.recipes import resolve_run  # noqa: E402
from megatron_emo.routing import router  # noqa: E402
from megatron_emo.training.cpu_mode import megatron_device  # noqa: E402
from megatron_emo.training.distributed import init_model_parallel, init_process_group, shutdown_distributed  # noqa: E402
from megatron_emo.training.flops import PEAK_BF16_TFLOPS  # noqa: E402
from megatron_emo.training.loop import resolve_data  # noqa: E402
from megatron_emo.training.metrics import run_info  # noqa: E402
from megatron_emo.validate import validate_run  # noqa: E402

EXIT_BAD_INPUT = 2

SYNTHETIC_EOS = 2

LOOP_ROUTER = Case(
    "loop-router",
    "emo with a per-document Python-loop router (host syncs), the original implementation's style",
    emo_model("emo"),
    patch=lambda: mock.patch.object(router, "route", per_document_loop_route),
)
ALL_CASES = {**CASES, "loop-router": LOOP_ROUTER}
DEFAULT_CASES = "emo,topk,dense,loop-router,mcore-moe"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="proxy_1gpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="recipe override, repeatable (as in megatron_emo.train)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, of {sorted(ALL_CASES)}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--profile-steps", type=int, default=1, help="steps for the time breakdown (0: none)")
    parser.add_argument("--trace-host", action="store_true",
                        help="trace the host too in the GPU-idle step: idle time by the code that launched "
                             "the work after each gap, and GPU time by kernel (slower; idle reads higher)")
    parser.add_argument("--data", choices=["synthetic", "recipe"], default="synthetic")
    parser.add_argument("--docs-per-row", type=int, default=30, help="documents per synthetic sequence")
    parser.add_argument("--output", help="directory for the JSON and the chart")
    parser.add_argument("--plot", metavar="JSON", help="only redraw the chart of an earlier run's JSON")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.plot is None and args.output is None:
        parser.error("--output is required (or --plot)")
    cases = args.cases.split(",")
    unknown = [name for name in cases if name not in ALL_CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {sorted(ALL_CASES)}")
    if args.warmup < 0 or args.steps < 1 or args.profile_steps < 0:
        parser.error("--warmup and --profile-steps must be >= 0 and --steps >= 1")
    if args.trace_host and (args.profile_steps == 0 or not torch.cuda.is_available()):
        parser.error("--trace-host traces the GPU-idle step: it needs a GPU and --profile-steps >= 1")
    args.cases = cases
    return args


def environment(run, config, runtime, args) -> dict:
    """Device, versions, code and layout: what every record carries."""
    info = run_info()
    device = torch.cuda.get_device_name() if runtime.on_gpu else "cpu"
    try:
        git = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
        status = git.stdout if git.returncode == 0 else None
    except OSError:  # no git here: the commit is "unknown" too
        status = None
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "peak_tflops_table": PEAK_BF16_TFLOPS,
        "command": " ".join(info["command"]),
        "python": info["python"],
        "packages": info["packages"],
        "git_commit": info["git_commit"],
        "git_dirty": None if status is None else bool(status.strip()),
        "recipe": run.name,
        "run_config": json.loads(json.dumps(dataclasses.asdict(run), default=str)),
        "layout": {
            "world_size": runtime.world_size,
            "data_parallel": runtime.data_parallel_size,
            "tensor_parallel": config.tensor_model_parallel_size,
            "pipeline_parallel": config.pipeline_model_parallel_size,
            "context_parallel": config.context_parallel_size,
            "expert_parallel": config.expert_model_parallel_size,
            "expert_tensor_parallel": config.expert_tensor_parallel_size,
        },
        "data": args.data if args.data == "recipe" else f"synthetic, {args.docs_per_row} documents per sequence",
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "profile_steps": args.profile_steps,
        "weights": "N(0, init_method_std) drawn on the device (the trainer's distribution)",
    }


def dataset_for(run, args):
    """(dataset, vocabulary size, EOS id) of the run's data or of synthetic documents."""
    samples = args.warmup + args.steps + args.profile_steps
    if args.data == "synthetic":
        vocab = run.model_vocab_size(run.data.demo_vocab_size)
        return SyntheticDocuments(seq_length=run.data.seq_length, vocab_size=vocab, eos_id=SYNTHETIC_EOS,
                                  docs_per_row=args.docs_per_row), vocab, SYNTHETIC_EOS
    blend, tokenizer = resolve_data(run)
    vocab = run.model_vocab_size(tokenizer.vocab_size)
    dataset = build_train_dataset(blend, tokenizer, seq_length=run.data.seq_length,
                                  num_samples=samples * run.data.global_batch_size, seed=run.data.seed,
                                  split=run.data.split, cache_dir=run.data.cache_dir)
    return dataset, vocab, tokenizer.eos_id


def output_stem(env: dict) -> str:
    match = re.search(r"[A-Z]+\d{2,3}", env["device"])
    device = match.group(0).lower() if match else re.sub(r"\W+", "_", env["device"]).lower()
    return f"{env['date']}_{device}_{env['recipe']}_throughput"


def benchmark(run, args, output: Path) -> list[dict]:
    """Run the cases, writing the results so far into ``output`` after each (rank 0)."""
    init_process_group()
    dataset, vocab, eos = dataset_for(run, args)
    config = run.emo_config(vocab_size=vocab, eos_token_id=eos, on_gpu=torch.cuda.is_available())
    runtime = init_model_parallel(config, seed=run.train.seed)
    log = print if runtime.rank == 0 else (lambda *a, **k: None)
    env = environment(run, config, runtime, args)
    log(f"{run.name} on {env['device']} x{runtime.world_size}: {run.data.global_batch_size} x "
        f"{run.data.seq_length} tokens per step, vocab {vocab}; cases {', '.join(args.cases)}", flush=True)
    records = []
    for name in args.cases:
        case = ALL_CASES[name]
        log(f"[{name}] {case.description}", flush=True)
        record = run_case(case, run, runtime, dataset, vocab_size=vocab, eos_id=eos, warmup=args.warmup,
                          steps=args.steps, profile_steps=args.profile_steps, trace_host=args.trace_host,
                          progress=lambda message, name=name: log(f"[{name}] {message}", flush=True))
        status = record.get("error") or f"{record['tokens_per_s_per_gpu']:.0f} tokens/s/GPU"
        log(f"[{name}] {record['status']}: {status}", flush=True)
        if "host_syncs" in record:
            log(f"[{name}] GPU idle {record['gpu_idle_ms']:.1f} ms of the profiled step; the host waited for the GPU "
                f"{record['host_syncs']} times: {record['host_syncs_by_line']}", flush=True)
        for site in record.get("gpu_idle_by_launch_site", [])[:report.IDLE_SITES_SHOWN]:
            log(f"[{name}]   idle {site['idle_ms']:.1f} ms in {site['gaps']} gaps before {site['site']}", flush=True)
        records.append({**record, **env})
        report.add_ratios(records)
        if runtime.rank == 0:
            write_json(records, env, output)
    return records


def write_json(records: list[dict], env: dict, directory: Path) -> None:
    """The results so far as ``<stem>.json`` in ``directory`` (replaced whole: never half-written)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / output_stem(env)).with_suffix(".json")
    results = {"records": records, "targets": report.targets(records)}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str))
    partial.replace(path)
    print(f"wrote {path} ({len(records)} of its cases)", flush=True)


def plot(results: dict, path: Path) -> None:
    records = results["records"]
    first = records[0]
    title = (f"{first['recipe']} on {first['device']}, {first['date']}, commit {str(first['git_commit'])[:10]}"
             f"{' (dirty)' if first['git_dirty'] else ''}")
    try:
        report.draw_chart(records, path, title)
        print(f"wrote {path}")
    except ImportError as error:  # the JSON is the result; the chart can be redrawn with --plot
        print(f"chart not drawn ({error}); redraw it with --plot on a machine with matplotlib")


def print_summary(records: list[dict]) -> None:
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        flops = ok[0]["flops"]
        forward = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in flops["forward_per_token_by_component"].items())
        print(f"FLOPs per token ({ok[0]['case']}): {flops['training_per_token'] / 1e9:.3f} G training = 3 x forward "
              f"[{forward}] GFLOP ({flops['formula']}); MFU against {ok[0]['peak_tflops'] or 'no known'} TFLOP/s")
    print(report.table(records))
    for target in report.targets(records):
        value = "-" if target["value"] is None else f"{target['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        print(f"target {target['target']} >= {target['at_least']}: {value} ({verdict})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        try:
            records = json.loads(Path(args.plot).read_text())
        except (OSError, ValueError) as error:
            print(f"error: --plot {args.plot}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        plot(records, Path(args.plot).with_suffix(".png"))
        return 0
    configure_cli_logging(args.verbose)
    output = Path(args.output)
    try:
        run = resolve_run(args.recipe, args.overrides)
        validate_run(run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with megatron_device():
        try:
            records = benchmark(run, args, output)
        except (DatasetError, FileNotFoundError) as error:  # --data recipe: the run's data
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        finally:
            shutdown_distributed()
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    print_summary(records)
    plot({"records": records}, (output / output_stem(records[0])).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
