"""Text files → a tokenized Megatron indexed dataset (the engine of tools/preprocess_data.py).

Documents come from :mod:`megatron_emo.data.inputs`; tokenisation runs in ``workers`` processes,
in order; a progress bar shows documents/s and MB/s.
"""

import multiprocessing
import os
import time
from pathlib import Path

from tqdm import tqdm

from megatron_emo.data.indexed import AtomicDatasetWriter, DatasetInfo
from megatron_emo.data.inputs import InputError, PreprocessSummary, read_documents
from megatron_emo.data.tokenizer import Tokenizer, encode_in_worker, init_worker


def preprocess(
    inputs: list[str | os.PathLike],
    output_prefix: str | os.PathLike,
    tokenizer_model: str | os.PathLike,
    *,
    text_key: str = "text",
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
    recorded_tokenizer: str | os.PathLike | None = None,
) -> tuple[DatasetInfo, PreprocessSummary]:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx/.json`` (published only when complete).
    The sidecar names ``recorded_tokenizer`` (default ``tokenizer_model``): where the tokenizer
    will be when the dataset is built in a folder that moves into place afterwards."""
    tokenizer = Tokenizer(tokenizer_model)
    summary = PreprocessSummary()
    started = time.perf_counter()
    documents = read_documents(inputs, text_key, strict, summary)
    with AtomicDatasetWriter(
        output_prefix, tokenizer=str(recorded_tokenizer or tokenizer.model_file), vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
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
        if writer.info.documents == 0:
            raise InputError(f"no documents in {', '.join(map(str, inputs))}: nothing to write")
    info = writer.info
    summary.documents, summary.tokens = info.documents, info.tokens
    summary.seconds = time.perf_counter() - started
    return info, summary
