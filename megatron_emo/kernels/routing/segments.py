"""Segment ordinals: the index of each token's segment, counted from where segments start.

The one PyTorch computation of it, for the routing reference, the Triton launcher (its kernels
read the ordinals) and :mod:`megatron_emo.routing.documents` (ordinals from EOS positions).
Vectorised, no host synchronisation.
"""

import torch


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool, the shape of ``segment_ids``: True at position 0 and wherever the id changes along
    the last dim (segments are contiguous runs of equal ids)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    return starts


def segment_ordinals(starts: torch.Tensor, *, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Ordinal of each position's segment along the last dim.

    Args:
        starts: bool ``[..., n]``, True where a segment starts. Position 0 always starts
            segment 0, whatever its flag (an EOS at a row's first token opens no new segment).
        dtype: of the result.

    Returns:
        ``[..., n]``: 0 up to the next start after position 0, then +1 at every start.
    """
    ordinals = starts.cumsum(-1, dtype=dtype)
    return ordinals - ordinals[..., :1]
