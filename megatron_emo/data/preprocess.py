"""Text files → a tokenized Megatron indexed dataset (the engine of tools/preprocess_data.py).

Inputs: ``.jsonl``/``.json`` files (one JSON object per line, the text under ``text_key``) and
plain-text files (one document per file). Empty documents are skipped and counted; a line that
is not UTF-8, not JSON, or has no text is reported with its file and line number and skipped
(counted), or stops the run with ``strict``. Tokenisation runs in ``workers`` processes, in
order; a progress bar shows documents/s and MB/s.
"""

import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from megatron_emo.data.indexed import AtomicDatasetWriter, DatasetInfo
from megatron_emo.data.tokenizer import Tokenizer, encode_in_worker, init_worker

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")


class InputError(ValueError):
    """A bad input line under ``strict``: names the file and line."""


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped_empty: int = 0
    skipped_invalid: int = 0
    problems: list[str] = field(default_factory=list)
    """The first reported input problems, ``file:line: what``."""
    seconds: float = 0.0

    def report(self) -> str:
        rate = self.bytes / 1e6 / max(self.seconds, 1e-9)
        return (
            f"{self.documents} documents, {self.tokens} tokens, {self.bytes / 1e6:.2f} MB in "
            f"{self.seconds:.1f} s ({rate:.2f} MB/s, {self.tokens / max(self.seconds, 1e-9):,.0f} "
            f"tokens/s); skipped {self.skipped_empty} empty and {self.skipped_invalid} invalid"
        )


MAX_PROBLEMS_KEPT = 100


def _note_problem(summary: PreprocessSummary, where: str, what: str, strict: bool) -> None:
    message = f"{where}: {what}"
    if strict:
        raise InputError(message)
    summary.skipped_invalid += 1
    if len(summary.problems) < MAX_PROBLEMS_KEPT:
        summary.problems.append(message)
    logger.warning("skipped %s", message)


def read_documents(paths: Iterable[str | os.PathLike], text_key: str, strict: bool,
                   summary: PreprocessSummary) -> Iterator[str]:
    """Yield each non-empty document's text; count and report what is skipped."""
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"input {path} does not exist")
        if path.suffix not in JSON_SUFFIXES:
            try:
                texts = [(f"{path}", path.read_bytes().decode("utf-8"))]
            except UnicodeDecodeError as error:
                _note_problem(summary, str(path), f"not UTF-8 ({error.reason} at byte {error.start})", strict)
                continue
        else:
            texts = _json_lines(path, text_key, strict, summary)
        for _, text in texts:
            if not text.strip():
                summary.skipped_empty += 1
                continue
            yield text


def _json_lines(path: Path, text_key: str, strict: bool, summary: PreprocessSummary):
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                _note_problem(summary, where, f"not UTF-8 ({error.reason} at byte {error.start})", strict)
                continue
            except json.JSONDecodeError as error:
                _note_problem(summary, where, f"malformed JSON ({error.msg})", strict)
                continue
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                _note_problem(summary, where, f"no string under key {text_key!r}", strict)
                continue
            yield where, text


def preprocess(
    inputs: list[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_model: str | os.PathLike,
    *,
    text_key: str = "text",
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
) -> tuple[DatasetInfo, PreprocessSummary]:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx/.json`` (published only when complete)."""
    tokenizer = Tokenizer(tokenizer_model)
    summary = PreprocessSummary()
    started = time.perf_counter()
    documents = read_documents(inputs, text_key, strict, summary)
    with AtomicDatasetWriter(
        output_prefix, tokenizer=str(tokenizer.model_file), vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id
    ) as writer, tqdm(unit="doc", disable=not progress, desc=Path(output_prefix).name) as bar:
        if workers > 1:
            # fork: the workers need nothing beyond the tokenizer, so nothing is re-imported.
            pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=init_worker, initargs=(str(tokenizer.model_file),)
            )
            encoded = pool.imap(encode_in_worker, documents, chunksize=64)
        else:
            init_worker(str(tokenizer.model_file))
            pool, encoded = None, map(encode_in_worker, documents)
        try:
            for token_ids, size in encoded:
                writer.add_document(token_ids)
                summary.bytes += size
                bar.update(1)
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{summary.bytes / 1e6 / elapsed:.2f} MB/s", refresh=False)
        finally:
            if pool is not None:
                pool.terminate()
    info = writer.info
    summary.documents, summary.tokens = info.documents, info.tokens
    summary.seconds = time.perf_counter() - started
    return info, summary
