"""Megatron indexed datasets (megatron_emo.data.indexed): megatron-core's format, written
atomically, checked before training."""

import gc
import json
import os
import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_emo.data.indexed import AtomicDatasetWriter, DatasetError, check_dataset, load_dataset_info

EOS = 3
DOCUMENTS = [[5, 6, 7], [8], [9, 10, 11, 12], [1999, 4]]


@pytest.fixture
def collect_garbage():
    """Collect the test's garbage when it ends: a megatron-core IndexedDataset that failed to open
    stays in a reference cycle with the error's traceback, and its ``__del__`` raises
    AttributeError when the collector gets to it. Left to a random later moment, that can be
    inside pytest's ast.parse of a traceback, which CPython 3.11.7 turns into an INTERNALERROR
    ("AST constructor recursion depth mismatch")."""
    yield
    gc.collect()


def write(prefix, documents=DOCUMENTS, *, vocab_size=2048, eos_id=EOS, tokenizer="tok.model"):
    with AtomicDatasetWriter(prefix, tokenizer=tokenizer, vocab_size=vocab_size, eos_id=eos_id) as writer:
        for doc in documents:
            writer.add_document(list(doc))
    return writer.info


def files(directory):
    return sorted(p.name for p in directory.iterdir())


def snapshot(prefix):
    return {ext: prefix.with_name(f"{prefix.name}.{ext}").read_bytes() for ext in ("bin", "idx", "json")}


def test_megatron_core_reads_our_files(tmp_path):
    prefix = tmp_path / "sub" / "data"  # the directory is created
    write(prefix)
    dataset = IndexedDataset(str(prefix))  # megatron-core's own reader, unchanged
    assert len(dataset) == len(DOCUMENTS)
    for i, doc in enumerate(DOCUMENTS):
        assert dataset[i].tolist() == doc + [EOS]
        assert dataset.get(i, offset=1, length=len(doc)).tolist() == doc[1:] + [EOS]
    assert dataset.sequence_lengths.tolist() == [len(doc) + 1 for doc in DOCUMENTS]
    # one sequence per document: megatron-core's document index has a boundary after each
    assert dataset.document_indices.tolist() == list(range(len(DOCUMENTS) + 1))
    assert dataset.index.dtype == np.uint16  # megatron's optimal dtype for a 2048 vocabulary
    assert files(prefix.parent) == ["data.bin", "data.idx", "data.json"]  # no temporary files


def test_sidecar_describes_the_dataset(tmp_path):
    info = write(tmp_path / "data", tokenizer="/some/tok.model")
    sidecar = json.loads((tmp_path / "data.json").read_text())
    assert sidecar == {
        "tokenizer": "/some/tok.model",
        "vocab_size": 2048,
        "eos_id": EOS,
        "documents": 4,
        "tokens": sum(len(doc) + 1 for doc in DOCUMENTS),
        "max_token_id": 1999,
    }
    assert load_dataset_info(tmp_path / "data") == info
    assert check_dataset(tmp_path / "data", vocab_size=2048, eos_id=EOS) == info


def test_large_vocabulary_uses_int32(tmp_path):
    write(tmp_path / "big", [[70_000, 5]], vocab_size=100_000)
    dataset = IndexedDataset(str(tmp_path / "big"))
    assert dataset.index.dtype == np.int32 and dataset[0].tolist() == [70_000, 5, EOS]


def test_exception_in_with_block_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        with AtomicDatasetWriter(tmp_path / "data", tokenizer="t", vocab_size=2048, eos_id=EOS) as writer:
            writer.add_document([5, 6])
            raise RuntimeError("interrupted")
    assert files(tmp_path) == []  # neither the dataset nor temporary files


def test_exception_leaves_an_existing_dataset_untouched(tmp_path):
    prefix = tmp_path / "data"
    write(prefix)
    before = snapshot(prefix)
    with pytest.raises(KeyboardInterrupt):
        with AtomicDatasetWriter(prefix, tokenizer="t", vocab_size=2048, eos_id=EOS) as writer:
            for _ in range(100):
                writer.add_document([7, 7, 7])
            raise KeyboardInterrupt
    assert snapshot(prefix) == before
    assert files(tmp_path) == ["data.bin", "data.idx", "data.json"]
    dataset = IndexedDataset(str(prefix))  # kept alive: its items are views of its mmap
    assert dataset[0].tolist() == DOCUMENTS[0] + [EOS]


def test_abort_removes_temporary_files(tmp_path):
    writer = AtomicDatasetWriter(tmp_path / "data", tokenizer="t", vocab_size=2048, eos_id=EOS)
    writer.add_document([5])
    assert files(tmp_path)  # something is being written ...
    writer.abort()
    assert files(tmp_path) == []  # ... and is gone


# --- errors of load_dataset_info / check_dataset ---------------------------------------------------


@pytest.mark.parametrize("ext", ["idx", "bin"])
def test_missing_file_is_named(tmp_path, ext):
    prefix = tmp_path / "data"
    write(prefix)
    missing = tmp_path / f"data.{ext}"
    missing.unlink()
    with pytest.raises(DatasetError, match=f"{missing} does not exist"):
        load_dataset_info(prefix)
    with pytest.raises(DatasetError, match=f"{missing} does not exist"):
        check_dataset(prefix, vocab_size=2048, eos_id=EOS)


def test_missing_prefix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(tmp_path / "nothing" / "here", vocab_size=2048, eos_id=EOS)


def test_truncated_bin(tmp_path):
    prefix = tmp_path / "data"
    write(prefix)
    os.truncate(tmp_path / "data.bin", (tmp_path / "data.bin").stat().st_size - 2)
    with pytest.raises(DatasetError, match="truncated") as error:
        check_dataset(prefix, vocab_size=2048, eos_id=EOS)
    assert str(tmp_path / "data.bin") in str(error.value) and str(tmp_path / "data.idx") in str(error.value)


def test_idx_of_another_dataset(tmp_path):
    write(tmp_path / "data")  # 14 tokens
    write(tmp_path / "other", [list(range(5, 25))])  # 21 tokens
    shutil.copy(tmp_path / "other.idx", tmp_path / "data.idx")
    with pytest.raises(DatasetError, match="does not belong to this .idx"):
        check_dataset(tmp_path / "data", vocab_size=2048, eos_id=EOS)


def test_idx_of_another_dataset_of_the_same_size(tmp_path):
    write(tmp_path / "data")  # 4 documents, 14 tokens
    write(tmp_path / "other", [list(range(5, 18))])  # 1 document, 14 tokens
    shutil.copy(tmp_path / "other.idx", tmp_path / "data.idx")
    with pytest.raises(DatasetError, match="do not belong together"):
        check_dataset(tmp_path / "data", vocab_size=2048, eos_id=EOS)


@pytest.mark.usefixtures("collect_garbage")
@pytest.mark.parametrize("content", [b"", b"not a megatron index\n" * 20, b"MMIDIDX\x00\x00" + b"\xff" * 100])
def test_garbage_idx(tmp_path, content):
    write(tmp_path / "data")
    (tmp_path / "data.idx").write_bytes(content)
    with pytest.raises(DatasetError, match="is not a Megatron index") as error:
        load_dataset_info(tmp_path / "data")
    assert str(tmp_path / "data.idx") in str(error.value)


@pytest.mark.usefixtures("collect_garbage")
@pytest.mark.parametrize(
    "keep",
    [
        20,  # inside the header
        50,
    ],
)
def test_truncated_idx(tmp_path, keep):
    write(tmp_path / "data")
    idx = tmp_path / "data.idx"
    idx.write_bytes(idx.read_bytes()[:keep])
    error = None
    try:
        load_dataset_info(tmp_path / "data")
    except Exception as raised:  # noqa: BLE001  (reported below, outside the handler)
        error = raised
    assert isinstance(error, DatasetError), f"{type(error).__name__}: {error}"
    assert str(idx) in str(error)


def test_token_id_beyond_the_vocabulary(tmp_path):
    write(tmp_path / "data", vocab_size=8192, tokenizer="big.model")  # max id 1999
    check_dataset(tmp_path / "data", vocab_size=2000, eos_id=EOS)
    with pytest.raises(DatasetError, match="token id 1999 does not fit the model's vocabulary of 1999") as error:
        check_dataset(tmp_path / "data", vocab_size=1999, eos_id=EOS)
    assert "big.model" in str(error.value)


def test_eos_mismatch(tmp_path):
    write(tmp_path / "data", eos_id=2, tokenizer="other.model")
    with pytest.raises(DatasetError, match="EOS 2 but the tokenizer's EOS is 3") as error:
        check_dataset(tmp_path / "data", vocab_size=2048, eos_id=EOS)
    assert "other.model" in str(error.value)


def test_dataset_without_sidecar_is_scanned_and_checked(tmp_path):
    prefix = tmp_path / "data"
    write(prefix)
    (tmp_path / "data.json").unlink()
    info = load_dataset_info(prefix)
    assert (info.documents, info.tokens, info.max_token_id) == (4, sum(len(d) + 1 for d in DOCUMENTS), 1999)
    assert info.eos_id == -1 and info.tokenizer == "unknown"  # not recorded: cannot be checked
    assert check_dataset(prefix, vocab_size=2048, eos_id=EOS) == info
    with pytest.raises(DatasetError, match="token id 1999 does not fit"):
        check_dataset(prefix, vocab_size=1024, eos_id=EOS)
    # a truncated .bin is still found without the sidecar
    os.truncate(tmp_path / "data.bin", 4)
    with pytest.raises(DatasetError, match="truncated"):
        check_dataset(prefix, vocab_size=2048, eos_id=EOS)
