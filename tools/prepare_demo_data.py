"""Build the multi-domain demo corpus (code, docs, prose) as Megatron indexed datasets.

    python tools/prepare_demo_data.py --output-dir runs/cache/demo
    python tools/prepare_demo_data.py --output-dir /tmp/demo --vocab-size 4096 --workers 2

Writes a SentencePiece tokenizer, one dataset per domain and a manifest (demo.json); prints the
size of each domain. Training builds the same directory itself when data.blend is empty.
"""

import argparse
import sys

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()  # before megatron-core is imported

from megatron_emo.data.demo_data import prepare_demo_data  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    manifest = prepare_demo_data(args.output_dir, vocab_size=args.vocab_size, workers=args.workers)
    print(f"tokenizer {manifest['tokenizer']}: {manifest['vocab_size']} pieces, EOS {manifest['eos_id']}")
    for domain, entry in manifest["domains"].items():
        print(f"{domain:6s} {entry['documents']:5d} documents {entry['tokens']:8d} tokens "
              f"{entry['bytes'] / 1e6:6.2f} MB  {entry['prefix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
