"""Which experts a model uses for which domain: usage matrices, specialisation, heat maps.

    python tools/analyze_experts.py --model runs/tiny/hf --demo-dir runs/cache/demo --output runs/tiny/experts
    python tools/analyze_experts.py --model runs/tiny --demo-dir runs/cache/demo --output runs/tiny/experts
    python tools/analyze_experts.py --model hf --text web=web.jsonl --text code=a.py,b.py --output experts

``--model`` is an exported Hugging Face folder, or a megatron_emo checkpoint (a ``step_N``
folder, a run's ``checkpoints`` folder or the run folder), exported first into the output
folder's ``hf/`` with tools/convert_to_hf.py. Text per domain: each demo domain's
held-out documents (``--demo-dir``, as tools/evaluate.py), and/or NAME=FILES (text or JSONL), up
to ``--max-tokens`` a domain.

Writes to ``--output``: ``experts.json`` (per layer the domain × expert matrices of top-k
selections and router probability, each domain's top ``--top-fraction`` experts and the share
of its selections they carry, the mutual information between domain and expert, the distinct
experts per document) and ``experts.png`` (heat maps). Measures: megatron_emo/analysis/.

Exit codes: 0 done; 2 bad input, or a package of the analysis extra not installed.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from megatron_emo.analysis.extras import exit_unless_installed
from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder, or a megatron_emo checkpoint or run folder")
    parser.add_argument("--demo-dir", help="demo data folder: analyse every demo domain's held-out documents")
    parser.add_argument("--text", action="append", default=[], metavar="NAME=FILES",
                        help="a domain of text (comma-separated text/JSONL files); repeatable")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="tokens per domain (default 20000)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--top-fraction", type=float, default=0.25,
                        help="share of the experts counted as a domain's own (default 0.25)")
    parser.add_argument("--output", required=True, help="folder for experts.json and experts.png")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def _tool(name: str):
    """A sibling tool's module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_hf_folder(model: Path, output: Path) -> Path:
    """``model`` if it is an HF folder, else its checkpoint exported to ``output/hf``."""
    if not model.exists():
        raise FileNotFoundError(f"--model {model} does not exist")
    if (model / "config.json").is_file():
        return model
    if _tool("convert_to_hf").main(["--checkpoint", str(model), "--output", str(output / "hf"), "--force"]) != 0:
        raise ValueError(f"{model} is neither a Hugging Face folder nor an exportable checkpoint")
    return output / "hf"


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    exit_unless_installed("analysis", "transformers", "scipy", "matplotlib")
    from megatron_emo.analysis.heatmap import plot_heatmaps
    from megatron_emo.analysis.specialisation import summarise
    from megatron_emo.analysis.usage import collect_usage, document_rows
    from megatron_emo.convert.hf_generate import load_hf_model, load_hf_tokenizer

    output = Path(args.output)
    try:
        texts = _tool("evaluate").held_out(args)  # the same text per domain as tools/evaluate.py
        output.mkdir(parents=True, exist_ok=True)
        folder = resolve_hf_folder(Path(args.model), output)
        model, tokenizer = load_hf_model(folder), load_hf_tokenizer(folder)
        documents = {}
        for domain, docs in texts.items():
            documents[domain], total = [], 0
            for text in docs:
                if total >= args.max_tokens:
                    break
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][:args.max_tokens - total]
                documents[domain].append(document_rows(ids, args.seq_length))
                total += len(ids)
            if not any(documents[domain]):
                raise ValueError(f"domain {domain!r} has no text to analyse")
        usage = collect_usage(model, documents, progress=sys.stderr.isatty())
        summary = {"model": str(args.model), **summarise(usage, args.top_fraction)}
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    (output / "experts.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_heatmaps(usage, output / "experts.png", title=f"{args.model}: expert use by domain")
    print(f"{usage.num_layers} layers, {usage.num_experts} routed experts, top-{usage.top_k}; "
          f"mutual information domain;expert {summary['mutual_information_bits_mean']:.3f} bits "
          f"(max {summary['mutual_information_max_bits']:.3f}), layer mean")
    print(f"{'domain':10s} {'tokens':>7s} {'documents':>9s} {f'top-{args.top_fraction:g} share':>15s} "
          f"{'distinct experts/doc':>20s}")
    for domain in usage.domains:
        print(f"{domain:10s} {summary['tokens'][domain]:7d} {summary['documents'][domain]:9d} "
              f"{summary['top_share_mean'][domain]:15.3f} "
              f"{summary['distinct_experts_per_document_mean'][domain]:20.2f}")
    print(f"wrote {output / 'experts.json'} and {output / 'experts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
