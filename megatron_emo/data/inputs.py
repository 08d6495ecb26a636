"""Reading documents from text and JSONL files, with every bad line reported and counted.

Inputs: ``.jsonl``/``.json`` files (one JSON object per line, the text under ``text_key``) and
plain-text files (one document per file). Empty documents are skipped and counted; a line that
is not UTF-8, not JSON, or has no text is reported with its file and line number and skipped
(counted), or raises :class:`InputError` with ``strict``. Imports nothing heavy, so the
tokenizer tool starts fast.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

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
                texts = [path.read_bytes().decode("utf-8")]
            except UnicodeDecodeError as error:
                _note_problem(summary, str(path), f"not UTF-8 ({error.reason} at byte {error.start})", strict)
                continue
        else:
            texts = _json_lines(path, text_key, strict, summary)
        for text in texts:
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
            yield text
