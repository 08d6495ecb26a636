"""Build the site-packages corpus (code, cpp, docs, prose) as Megatron indexed datasets.

    python tools/prepare_site_corpus.py --output-dir .corpus --workers 2
    python tools/prepare_site_corpus.py --output-dir /tmp/site --site-dir /other/site-packages \\
        --cap-mb 2 --min-mb 0.5 --vocab-size 4096

Reads the installed packages of this interpreter, or of --site-dir (what each domain holds:
megatron_emo/data/site_corpus.py), and writes into --output-dir:

    tokenizer.model            SentencePiece BPE trained on an equal share of every domain
    <domain>.bin/.idx/.json    one megatron indexed dataset per domain (the domain label)
    manifest.json              per domain its documents, tokens, bytes and source packages; the
                               installed packages and versions, the caps, the exact command;
                               written last: its presence means complete
    text/<domain>.jsonl        the documents, with --keep-text only (training does not read them)

It goes through the same code as tools/train_tokenizer.py and tools/preprocess_data.py, and
prints each domain's size and the examples/emo_effect/emo_effect.py arguments that train on it.
A non-empty --output-dir is replaced only with --force, and only if it holds nothing but what
this tool writes. The build goes into a folder beside it, which takes its place only once complete
(megatron_emo.files.replace_folder): a build that fails leaves the earlier one as it was.

Exit codes: 0 done; 2 bad input (a missing --site-dir, a domain smaller than --min-mb, a
non-empty --output-dir without --force, or one that --force may not replace).
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

from megatron_emo.logs import add_verbose_argument, configure_cli_logging, quiet_megatron_warnings

quiet_megatron_warnings()  # before megatron-core is imported

from megatron_emo.data.preprocess import preprocess  # noqa: E402
from megatron_emo.data.site_corpus import (  # noqa: E402
    DOMAIN_BYTES,
    DOMAINS,
    MIN_DOMAIN_BYTES,
    CorpusError,
    installed_packages,
    site_dirs,
    site_documents,
    tokenizer_sample,
)
from megatron_emo.data.tokenizer import train_tokenizer  # noqa: E402
from megatron_emo.files import replace_folder  # noqa: E402

EXIT_BAD_INPUT = 2
MANIFEST = "manifest.json"
OUTPUT_ENTRY = re.compile(rf"{re.escape(MANIFEST)}|tokenizer\.model|text|({'|'.join(DOMAINS)})\.(bin|idx|json)")
"""The names of what a build writes: ``--force`` replaces a folder holding nothing else."""


class OutputError(Exception):
    """An ``--output-dir`` this tool may not write or replace."""


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="the folder to build the corpus in")
    parser.add_argument("--site-dir", action="append", default=[], metavar="DIR",
                        help="a site-packages folder to read; repeatable (default: this interpreter's)")
    parser.add_argument("--vocab-size", type=_positive(int), default=8192, help="tokenizer pieces (default: 8192)")
    parser.add_argument("--cap-mb", type=_positive(float), help="MB of text per domain at most (default: "
                        + ", ".join(f"{domain} {cap / 1e6:g}" for domain, cap in DOMAIN_BYTES.items()) + ")")
    parser.add_argument("--min-mb", type=_positive(float), default=MIN_DOMAIN_BYTES / 1e6,
                        help=f"MB of text every domain needs, or the build stops (default: {MIN_DOMAIN_BYTES / 1e6:g})")
    parser.add_argument("--workers", type=_positive(int), default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--keep-text", action="store_true", help="keep the documents as text/<domain>.jsonl")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier build in --output-dir (never a folder holding other files)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verbose_argument(parser)
    return parser.parse_args(argv)


def check_output(output: Path, *, force: bool) -> None:
    """Refuse a file, a non-empty folder without ``force`` and a folder holding anything a build
    does not write."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise OutputError(f"refusing --output-dir {output}: it is a file or a symbolic link, not a folder")
    entries = sorted(output.iterdir()) if output.exists() else []
    if not entries:
        return
    if not force:
        raise OutputError(f"{output} exists and is not empty: pass --force to replace the earlier build there, "
                          "or choose another --output-dir")
    others = [entry.name for entry in entries if entry.is_symlink() or not OUTPUT_ENTRY.fullmatch(entry.name)]
    if others:
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise OutputError(f"refusing to replace {output}: it holds {', '.join(others[:5])}{more}, which a build does "
                          "not write (--force replaces only an earlier build); move them away or choose another "
                          "--output-dir")


def write_text(documents: dict[str, list[str]], text_dir: Path) -> dict[str, Path]:
    """Each domain's documents as ``text_dir/<domain>.jsonl`` (the preprocessing input)."""
    text_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for domain, docs in documents.items():
        paths[domain] = text_dir / f"{domain}.jsonl"
        with open(paths[domain], "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    return paths


def build(args, command: str) -> dict:
    """Collect, tokenize and write the corpus; return its manifest."""
    started = time.time()
    output = Path(args.output_dir)
    roots = [Path(d) for d in args.site_dir] or site_dirs()
    caps = {domain: int(args.cap_mb * 1e6) for domain in DOMAINS} if args.cap_mb is not None else dict(DOMAIN_BYTES)
    progress = not args.no_progress
    check_output(output, force=args.force)
    documents, sources = site_documents(roots, caps=caps, min_bytes=int(args.min_mb * 1e6), progress=progress)
    staging = output.with_name(f".{output.name}.building-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        manifest = _write(staging, output, documents, sources, args, command, caps, roots)
        manifest.update(date=time.strftime("%Y-%m-%d"), seconds=round(time.time() - started))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write(staging: Path, output: Path, documents, sources, args, command, caps, roots) -> dict:
    """The tokenizer and the datasets in ``staging``; the manifest names them where they will be,
    in ``output``."""
    progress = not args.no_progress
    texts = write_text(documents, staging / "text")
    tokenizer = train_tokenizer(tokenizer_sample(documents), staging / "tokenizer.model", args.vocab_size)
    manifest = {"corpus": "site-packages", "command": command, "tokenizer": str(output / "tokenizer.model"),
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "domains": {},
                "caps_bytes": caps, "python": platform.python_version(), "site_dirs": [str(r) for r in roots],
                "packages": installed_packages(roots)}
    for domain in DOMAINS:
        info, summary = preprocess([texts[domain]], staging / domain, tokenizer.model_file, workers=args.workers,
                                   progress=progress, recorded_tokenizer=manifest["tokenizer"])
        manifest["domains"][domain] = {"prefix": str(output / domain), "documents": info.documents,
                                       "tokens": info.tokens, "bytes": summary.bytes, "sources": sources[domain]}
    if not args.keep_text:
        shutil.rmtree(staging / "text")
    return manifest


def emo_effect_arguments(manifest: dict) -> str:
    """The ``--data`` and ``--tokenizer-model`` arguments of examples/emo_effect/emo_effect.py."""
    data = " ".join(f"--data {shlex.quote(entry['prefix'])}" for entry in manifest["domains"].values())
    return f"{data} --tokenizer-model {shlex.quote(manifest['tokenizer'])}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    configure_cli_logging(args.verbose)
    command = shlex.join(["python", "tools/prepare_site_corpus.py", *argv])
    try:
        manifest = build(args, command)
    except (OutputError, CorpusError, FileNotFoundError, RuntimeError) as error:  # RuntimeError: sentencepiece's
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    output = Path(args.output_dir)
    print(f"tokenizer {manifest['tokenizer']}: {manifest['vocab_size']} pieces, EOS {manifest['eos_id']}")
    for domain, entry in manifest["domains"].items():
        print(f"{domain:6s} {entry['documents']:6d} documents {entry['tokens']:9d} tokens "
              f"{entry['bytes'] / 1e6:6.2f} MB  {entry['prefix']}")
    size = sum(path.stat().st_size for path in output.rglob("*") if path.is_file())
    print(f"wrote {output} ({size / 2**20:.1f} MiB) in {manifest['seconds']} s; train on it with\n"
          f"  python examples/emo_effect/emo_effect.py --output-dir runs/emo_effect_site --scale gpu "
          f"{emo_effect_arguments(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
