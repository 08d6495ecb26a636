"""Tokenize text into a Megatron indexed dataset (``.bin/.idx``), one EOS after each document.

    python tools/preprocess_data.py --input data/*.jsonl --tokenizer-model tok.model \\
        --output-prefix data/web --workers 8
    python tools/preprocess_data.py --input book.txt --tokenizer-model tok.model --output-prefix data/book

Inputs: ``.jsonl``/``.json`` (one JSON object per line, text under --text-key) or plain text
(one document per file). Empty documents are skipped and counted; lines that are not UTF-8,
not JSON or have no text are reported with file and line and skipped, or stop the run with
--strict (exit 2). Output goes to temporary names and is renamed when complete, with a
``<prefix>.json`` summary that training uses to check the dataset against the model. The
prefix is what ``--set data.blend=...`` takes.
"""

import argparse
import sys

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()  # before megatron-core is imported

from megatron_emo.data.inputs import InputError  # noqa: E402
from megatron_emo.data.preprocess import preprocess  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--text-key", default="text", help="JSON key of the text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input line")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        info, summary = preprocess(
            args.input, args.output_prefix, args.tokenizer_model, text_key=args.text_key,
            workers=args.workers, strict=args.strict, progress=not args.no_progress,
        )
    except (InputError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {summary.report()}")
    for problem in summary.problems:
        print(f"  skipped {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
