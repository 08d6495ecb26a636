"""Train a SentencePiece BPE tokenizer (byte fallback) on text or JSONL files.

    python tools/train_tokenizer.py --input corpus/*.jsonl --vocab-size 32000 --output tok.model
    python tools/train_tokenizer.py --input notes.txt --text-key body --vocab-size 8000 --output tok.model

Ids: 0 pad, 1 unk, 2 bos, 3 eos. Inputs as for tools/preprocess_data.py (a .txt file is one
document, .jsonl has one JSON object per line with the text under --text-key).
"""

import argparse
import logging
import sys

from megatron_emo.data.inputs import InputError, PreprocessSummary, read_documents
from megatron_emo.data.tokenizer import train_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    parser.add_argument("--output", required=True, help="the .model file to write")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--text-key", default="text", help="JSON key of the text (default: text)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = PreprocessSummary()
    try:
        documents = list(read_documents(args.input, args.text_key, args.strict, summary))
        if not documents:
            raise InputError("no documents in the inputs")
        tokenizer = train_tokenizer(documents, args.output, args.vocab_size)
    except (InputError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {tokenizer.vocab_size} pieces, EOS {tokenizer.eos_id}, trained on "
          f"{len(documents)} documents (skipped {summary.skipped_empty} empty, {summary.skipped_invalid} invalid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
