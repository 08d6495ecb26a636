"""Synthetic packed documents: random tokens with EOS separators, ~N documents per sequence."""

import torch


def cut_into_documents(row: torch.Tensor, docs_per_row: int, eos_id: int, generator: torch.Generator) -> None:
    """Write ``docs_per_row - 1`` EOS tokens at distinct random positions after the first of
    ``row`` (1-D, in place): with the row's start, ``docs_per_row`` router segments."""
    starts = torch.randperm(row.shape[0] - 1, generator=generator)[: docs_per_row - 1] + 1
    row[starts] = eos_id


class SyntheticDocuments:
    """A dataset of random token sequences, each cut into ``docs_per_row`` documents.

    Item ``i`` is a dict like megatron-core's GPTDataset gives (int64 ``tokens`` and ``labels``
    ``[seq_length]``, fp32 ``loss_mask``), a pure function of ``(seed, i)``. Tokens are uniform
    on ``[eos_id + 1, vocab_size)``; ``docs_per_row - 1`` EOS tokens sit at distinct random
    positions after the first, so every row holds exactly ``docs_per_row`` router segments.
    """

    def __init__(self, *, seq_length: int, vocab_size: int, eos_id: int, docs_per_row: int, seed: int = 0):
        if not 1 <= docs_per_row <= seq_length:
            raise ValueError(f"docs_per_row={docs_per_row} must be in [1, seq_length={seq_length}]")
        if not 0 <= eos_id < vocab_size - 1:
            raise ValueError(f"eos_id={eos_id} must leave other ids in [0, vocab_size={vocab_size})")
        self.seq_length, self.vocab_size, self.eos_id = seq_length, vocab_size, eos_id
        self.docs_per_row, self.seed = docs_per_row, seed

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        sample = torch.randint(self.eos_id + 1, self.vocab_size, (self.seq_length + 1,), generator=generator)
        cut_into_documents(sample[:-1], self.docs_per_row, self.eos_id, generator)
        return {"tokens": sample[:-1], "labels": sample[1:], "loss_mask": torch.ones(self.seq_length)}
