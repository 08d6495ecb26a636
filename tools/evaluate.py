"""Perplexity of exported models (full or pruned) on held-out text, per domain.

    python tools/evaluate.py --hf runs/tiny/hf runs/tiny/hf-code-25 --demo-dir runs/cache/demo
    python tools/evaluate.py --hf hf --text web=held_out/web.jsonl --text code=held_out/code.jsonl

Held-out text: each demo domain's held-out documents (those training validates on), or
NAME=FILES (text or JSONL). Rows never cross a document. Prints a table and, with --output,
writes JSON (one record per model and domain). A megatron_emo checkpoint is evaluated by
exporting it first (tools/convert_to_hf.py): the HF model is how EMO models run, with no pool.

Exit codes: 0 done; 2 bad input, or transformers not installed.
"""

import argparse
import json
import logging
import sys

from tqdm import tqdm

from megatron_emo.analysis.extras import exit_unless_installed
from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()

EXIT_BAD_INPUT = 2

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", nargs="+", required=True, help="exported Hugging Face folders")
    parser.add_argument("--demo-dir", help="demo data folder: evaluate every demo domain's held-out documents")
    parser.add_argument("--text", action="append", default=[], metavar="NAME=FILES",
                        help="a domain of held-out text (comma-separated text/JSONL files); repeatable")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=None, help="cap per domain")
    parser.add_argument("--output", help="JSON file to write")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def held_out(args) -> dict[str, list[str]]:
    from megatron_emo.data.demo_corpus import DOMAINS
    from megatron_emo.data.demo_data import domain_texts
    from megatron_emo.data.inputs import PreprocessSummary, read_documents

    domains = {}
    if args.demo_dir:
        domains.update({domain: domain_texts(args.demo_dir, domain)[1] for domain in DOMAINS})
    for entry in args.text:
        name, sep, files = entry.partition("=")
        if not sep or not files:
            raise ValueError(f"--text {entry!r} is not NAME=FILES")
        domains[name] = list(read_documents(files.split(","), "text", False, PreprocessSummary()))
    if not domains:
        raise ValueError("give --demo-dir or --text NAME=FILES")
    return domains


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    exit_unless_installed("hf", "transformers")
    from megatron_emo.convert.hf_folder import check_hf_folder
    from megatron_emo.convert.hf_generate import load_hf_model, load_hf_tokenizer
    from megatron_emo.convert.prune import perplexity, token_batches

    try:
        for hf_dir in args.hf:  # every folder before the first evaluation
            check_hf_folder(hf_dir)
        domains = held_out(args)
        records = []
        for hf_dir in args.hf:
            model, tokenizer = load_hf_model(hf_dir), load_hf_tokenizer(hf_dir)
            for domain, texts in domains.items():
                batches = token_batches(tokenizer, texts, seq_length=args.seq_length, max_tokens=args.max_tokens)
                # A line per domain for logs; a bar per row on a terminal.
                logger.info("evaluating %s on %s: %d rows", hf_dir, domain, len(batches))
                ppl, tokens = perplexity(model, tqdm(batches, desc=domain, unit="row", leave=False,
                                                     disable=not sys.stderr.isatty()))
                records.append({"model": hf_dir, "domain": domain, "perplexity": ppl, "tokens": tokens,
                                "num_experts": model.config.num_experts})
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{'model':40s} {'domain':8s} {'experts':>7s} {'tokens':>7s} {'perplexity':>10s}")
    for r in records:
        print(f"{r['model'][-40:]:40s} {r['domain']:8s} {r['num_experts']:7d} {r['tokens']:7d} {r['perplexity']:10.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
