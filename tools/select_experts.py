"""Prune an exported model to K routed experts per layer (plus the shared one) for a domain.

    python tools/select_experts.py --hf runs/tiny/hf --output runs/tiny/hf-code-25 --keep-fraction 0.25 \\
        --demo-dir runs/cache/demo --domain code
    python tools/select_experts.py --hf hf --output hf-k32 --keep 31 --calibration task.jsonl --method hits

Calibration text: a demo domain (its training share of documents) or --calibration text/JSONL
files. Methods (megatron_emo/convert/prune.py): usage (layerwise greedy by mean router
probability, EMO's default), hits (layerwise greedy by top-k selections), random (baseline).
The output loads in stock transformers and carries pruning_metadata.json.

Exit codes: 0 done; 2 bad input (K larger than the experts or smaller than the routed top-k, no
calibration text, a folder that is not an export) or transformers not installed.
"""

import argparse
import sys

from megatron_emo.analysis.extras import exit_unless_installed
from megatron_emo.data.demo_corpus import DOMAINS
from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="exported Hugging Face folder (Qwen2-MoE)")
    parser.add_argument("--output", required=True, help="pruned folder to write")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, help="routed experts kept per layer")
    size.add_argument("--keep-fraction", type=float, help="share of the routed experts kept per layer")
    parser.add_argument("--method", default="usage", choices=("usage", "hits", "random"))
    parser.add_argument("--calibration", nargs="+", help="text or JSONL files of calibration text")
    parser.add_argument("--demo-dir", help="demo data folder (tools/prepare_demo_data.py), with --domain")
    parser.add_argument("--domain", choices=DOMAINS, help="demo domain to calibrate on (its training documents)")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="calibration tokens (default 20000)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="for --method random")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def calibration_texts(args) -> tuple[list[str], dict]:
    from megatron_emo.data.demo_data import domain_texts
    from megatron_emo.data.inputs import PreprocessSummary, read_documents

    if args.calibration:
        return list(read_documents(args.calibration, "text", False, PreprocessSummary())), {"files": args.calibration}
    if not (args.demo_dir and args.domain):
        raise ValueError("give --calibration files, or --demo-dir with --domain")
    training_share, _ = domain_texts(args.demo_dir, args.domain)  # the held-out share stays for evaluation
    return training_share, {"demo_domain": args.domain, "demo_dir": args.demo_dir}


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    exit_unless_installed("hf", "transformers", "safetensors")
    from megatron_emo.convert.hf_generate import load_hf_model, load_hf_tokenizer
    from megatron_emo.convert.prune import select_experts, token_batches, write_pruned
    from megatron_emo.convert.qwen2_moe import ConversionError

    try:
        texts, source = calibration_texts(args)
        model, tokenizer = load_hf_model(args.hf), load_hf_tokenizer(args.hf)
        batches = token_batches(tokenizer, texts, seq_length=args.seq_length, max_tokens=args.max_tokens)
        if not batches:
            raise ValueError("the calibration text is empty")
        keep = args.keep if args.keep is not None else max(1, round(args.keep_fraction * model.config.num_experts))
        kept = select_experts(model, batches, keep, args.method, seed=args.seed, progress=sys.stderr.isatty())
        calibration = {**source, "tokens": sum(b.shape[1] for b in batches), "max_tokens": args.max_tokens}
        write_pruned(args.hf, args.output, kept, method=args.method, calibration=calibration)
    except (ValueError, FileNotFoundError, OSError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {args.output}: {keep} of {model.config.num_experts} routed experts per layer "
          f"({args.method}) + shared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
