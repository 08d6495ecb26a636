"""Build the demo corpus into a data directory: tokenizer and one indexed dataset per domain.

    <dir>/text/<domain>.jsonl      the documents, one JSON object per line ({"text": ...})
    <dir>/tokenizer.model          SentencePiece BPE trained on all domains
    <dir>/<domain>.bin/.idx/.json  megatron indexed datasets (one per domain: the domain label)
    <dir>/demo.json                the manifest, written last: its presence means complete

It goes through the same code as tools/preprocess_data.py. A directory whose manifest matches
the requested vocabulary is reused.
"""

import json
import os
from pathlib import Path

from megatron_emo.data.demo_corpus import DOMAINS, demo_documents
from megatron_emo.data.preprocess import preprocess
from megatron_emo.data.tokenizer import train_tokenizer

MANIFEST = "demo.json"


def prepare_demo_data(output_dir: str | os.PathLike, *, vocab_size: int = 2048, workers: int = 1,
                      progress: bool = True) -> dict:
    """Build (or reuse) the demo data in ``output_dir`` and return its manifest.

    The manifest has ``tokenizer`` (path), ``vocab_size``, ``eos_id`` and per domain its
    ``prefix``, ``documents``, ``tokens`` and ``bytes``.
    """
    output_dir = Path(output_dir)
    manifest_path = output_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["vocab_size"] == vocab_size:
            return manifest
    documents = demo_documents()
    (output_dir / "text").mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        with open(output_dir / "text" / f"{domain}.jsonl", "w", encoding="utf-8") as out:
            out.writelines(json.dumps({"text": doc}) + "\n" for doc in documents[domain])
    all_documents = [doc for domain in DOMAINS for doc in documents[domain]]
    tokenizer = train_tokenizer(all_documents, output_dir / "tokenizer.model", vocab_size)
    manifest = {"tokenizer": str(tokenizer.model_file), "vocab_size": vocab_size,
                "eos_id": tokenizer.eos_id, "domains": {}}
    for domain in DOMAINS:
        prefix = output_dir / domain
        info, summary = preprocess([output_dir / "text" / f"{domain}.jsonl"], prefix,
                                   tokenizer.model_file, workers=workers, progress=progress)
        manifest["domains"][domain] = {"prefix": str(prefix), "documents": info.documents,
                                       "tokens": info.tokens, "bytes": summary.bytes}
    tmp = manifest_path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)
    return manifest


def domain_texts(demo_dir: str | os.PathLike, domain: str, held_out_share: float = 0.02) -> tuple[list[str], list[str]]:
    """A demo domain's documents as (training share, held-out share): training's data.split
    '98,2,0' gives each dataset's last 2% of documents to validation."""
    path = Path(demo_dir) / "text" / f"{domain}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build the demo data (tools/prepare_demo_data.py)")
    documents = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    cut = int(round(len(documents) * (1 - held_out_share)))
    return documents[:cut], documents[cut:]
