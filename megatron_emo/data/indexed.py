"""Megatron ``.bin/.idx`` indexed datasets: written atomically, checked before training.

The files are megatron-core's own format (written with its ``IndexedDatasetBuilder``, read with
its ``IndexedDataset``): one sequence per document, each ending with the tokenizer's EOS, so
document boundaries survive packing. Beside them a small ``<prefix>.json`` records the
tokenizer, EOS id, counts and the largest token id, so training can check a dataset against the
model without scanning it.
"""

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file and the problem."""


@dataclass
class DatasetInfo:
    """The ``<prefix>.json`` sidecar."""

    tokenizer: str
    vocab_size: int
    eos_id: int
    documents: int
    tokens: int
    max_token_id: int


class AtomicDatasetWriter:
    """Writes ``<prefix>.bin/.idx/.json`` under temporary names and publishes them on ``close``.

    The ``.idx`` is renamed last: a dataset without it is incomplete, and an interrupted run
    (``abort`` or an exception in a ``with`` block) removes its temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, *, tokenizer: str, vocab_size: int, eos_id: int):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = {ext: self._path(f"{ext}.tmp-{os.getpid()}") for ext in ("bin", "idx", "json")}
        self._builder = IndexedDatasetBuilder(str(self._tmp["bin"]), dtype=DType.optimal_dtype(vocab_size))
        self.info = DatasetInfo(tokenizer, vocab_size, eos_id, documents=0, tokens=0, max_token_id=-1)

    def _path(self, ext: str) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.{ext}")

    def add_document(self, token_ids: list[int]) -> None:
        """Append one document; its EOS is added here."""
        tokens = np.asarray(token_ids + [self.info.eos_id], dtype=np.int64)
        self._builder.add_item(torch.from_numpy(tokens))
        self._builder.end_document()
        self.info.documents += 1
        self.info.tokens += len(tokens)
        self.info.max_token_id = max(self.info.max_token_id, int(tokens.max()))

    def close(self) -> DatasetInfo:
        self._builder.finalize(str(self._tmp["idx"]))
        self._tmp["json"].write_text(json.dumps(asdict(self.info), indent=2))
        for ext in ("bin", "json", "idx"):
            os.replace(self._tmp[ext], self._path(ext))
        return self.info

    def abort(self) -> None:
        self._builder.data_file.close()
        for path in self._tmp.values():
            path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def load_dataset_info(prefix: str | os.PathLike) -> DatasetInfo:
    """Open ``prefix`` with megatron-core, check ``.idx`` against ``.bin``, and describe it.

    Without a ``.json`` sidecar (data preprocessed elsewhere) the token ids are scanned once.

    Raises:
        DatasetError: a missing file, an index that does not describe its ``.bin``.
    """
    prefix = Path(prefix)
    idx, bin_ = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise DatasetError(f"dataset {prefix}: {path} does not exist")
    try:
        dataset = IndexedDataset(str(prefix))
    except (AssertionError, ValueError, struct.error, OSError) as error:
        raise DatasetError(f"dataset {prefix}: {idx} is not a Megatron index ({error})") from error
    index = dataset.index
    expected = (
        0 if len(index) == 0 else int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    )
    if expected != bin_.stat().st_size:
        raise DatasetError(
            f"dataset {prefix}: {idx} describes {expected} bytes of tokens but {bin_} has "
            f"{bin_.stat().st_size}: the .bin is truncated or does not belong to this .idx; "
            "preprocess the data again"
        )
    sidecar = prefix.with_name(prefix.name + ".json")
    if sidecar.is_file():
        info = DatasetInfo(**json.loads(sidecar.read_text()))
        indexed = (len(index), int(index.sequence_lengths.sum()) if len(index) else 0)
        if indexed != (info.documents, info.tokens):
            raise DatasetError(
                f"dataset {prefix}: {idx} holds {indexed[0]} documents and {indexed[1]} tokens but "
                f"{sidecar} says {info.documents} and {info.tokens}: the files do not belong together; "
                "preprocess the data again"
            )
        return info
    tokens = np.memmap(bin_, dtype=index.dtype, mode="r")
    return DatasetInfo(
        tokenizer="unknown",
        vocab_size=-1,
        eos_id=-1,
        documents=len(index.document_indices) - 1,
        tokens=len(tokens),
        max_token_id=int(tokens.max()) if len(tokens) else -1,
    )


def check_dataset(prefix: str | os.PathLike, *, vocab_size: int, eos_id: int) -> DatasetInfo:
    """:func:`load_dataset_info`, then check the dataset fits the model.

    Raises:
        DatasetError: token ids beyond the vocabulary, or another EOS than the model's.
    """
    info = load_dataset_info(prefix)
    if info.max_token_id >= vocab_size:
        raise DatasetError(
            f"dataset {prefix}: token id {info.max_token_id} does not fit the model's vocabulary of "
            f"{vocab_size}: it was made with another tokenizer ({info.tokenizer})"
        )
    if info.eos_id not in (-1, eos_id):
        raise DatasetError(
            f"dataset {prefix}: its documents end with EOS {info.eos_id} but the tokenizer's EOS is "
            f"{eos_id}: preprocess it with the training tokenizer ({info.tokenizer})"
        )
    return info
