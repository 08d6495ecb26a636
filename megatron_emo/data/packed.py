"""Packed training samples: documents joined by EOS and cut into fixed-length rows.

Each document is followed by one EOS; the documents are shuffled once with the data seed,
concatenated, and cut into samples of ``seq_length + 1`` tokens (inputs and next-token labels
overlap by one). Documents may span two samples, as in pretraining. Sample ``i`` of an epoch is
a pure function of ``i``, so a step's batch never depends on the parallel layout.
"""

import numpy as np
import torch


class PackedSamples:
    def __init__(self, documents: list[list[int]], eos_id: int, seq_length: int, seed: int):
        order = np.random.default_rng(seed).permutation(len(documents))
        stream = np.concatenate([np.append(np.asarray(documents[i], dtype=np.int64), eos_id) for i in order])
        self.seq_length = seq_length
        self.num_samples = (len(stream) - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(
                f"the corpus has {len(stream)} tokens, too few for one sample of "
                f"{seq_length + 1}: use more data or a shorter data.seq_length"
            )
        self.tokens = torch.from_numpy(stream[: self.num_samples * seq_length + 1])

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, sample_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels, int64 ``[b, seq_length]`` each, for global sample indices (wrapping
        around the corpus every epoch)."""
        starts = (sample_indices % self.num_samples) * self.seq_length
        windows = starts[:, None] + torch.arange(self.seq_length + 1)
        rows = self.tokens[windows]
        return rows[:, :-1], rows[:, 1:]
