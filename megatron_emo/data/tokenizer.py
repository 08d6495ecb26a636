"""SentencePiece tokenizer: train one on documents, load one from a ``.model`` file.

:class:`Tokenizer` also offers the attributes megatron-core's ``GPTDataset`` reads from a
tokenizer (``eod``, ``pad``, ``vocab_size``, ``unique_identifiers``).
"""

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    """A SentencePiece model behind the small interface the trainer needs."""

    def __init__(self, model_file: str | os.PathLike):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"tokenizer model {model_file} does not exist")
        self.model_file = model_file
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except RuntimeError as error:  # how sentencepiece reports a file it cannot load as a model
            raise _unusable(f"tokenizer model {model_file} is not a SentencePiece model ({error}): give a "
                            "SentencePiece .model file, as tools/train_tokenizer.py writes") from error
        if self._sp.eos_id() < 0:
            raise _unusable(f"tokenizer {model_file} has no EOS token; EMO needs one to separate documents "
                            "(tools/train_tokenizer.py trains tokenizers with one)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eod(self) -> int:
        return self.eos_id

    @property
    def pad(self) -> int:
        return self.pad_id

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core hashes into its dataset cache names: the model's content."""
        return {"sentencepiece_sha256": hashlib.sha256(self.model_file.read_bytes()).hexdigest()}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))


def _unusable(message: str) -> Exception:
    """A DatasetError, which every command line that reads a tokenizer reports as bad input.
    Imported here, on failure only: megatron_emo.data.indexed imports megatron-core, which takes
    seconds to import and which tools/train_tokenizer.py never needs."""
    from megatron_emo.data.indexed import DatasetError

    return DatasetError(message)


EOS_ID = 3
"""The EOS id of the tokenizers this package trains (:func:`train_tokenizer`)."""


def train_tokenizer(documents: list[str], model_file: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """Train a Llama-style BPE model and write it atomically.

    Lossless: byte fallback (no unknown text), identity normalisation and no whitespace
    collapsing (code keeps its indentation), digits split. Ids: 0 pad, 1 unk, 2 bos, 3 eos.
    """
    model_file = Path(model_file)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_file.parent) as tmp:
        prefix = Path(tmp) / "spm"
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for doc in documents for line in doc.splitlines() if line.strip()),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=EOS_ID,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(prefix.with_suffix(".model"), model_file)
    return Tokenizer(model_file)


def padded_vocab_size(vocab_size: int, multiple: int, tensor_parallel_size: int = 1) -> int:
    """Megatron's convention: pad to a multiple of ``multiple * tensor_parallel_size``."""
    step = multiple * tensor_parallel_size
    return -(-vocab_size // step) * step


# Tokenizer worker processes (tools/preprocess_data.py --workers): this module imports only
# sentencepiece, so spawning a worker is cheap.
_worker_tokenizer = None


def init_worker(model_file: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_file)


def encode_in_worker(text: str) -> tuple[list[int], int]:
    """Token ids of ``text`` and its size in UTF-8 bytes."""
    return _worker_tokenizer.encode(text), len(text.encode("utf-8"))
