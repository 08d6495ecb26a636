"""Document identities and layout-invariant pool sizes.

EMO restricts every document to a pool of experts, so the router must know where documents
start. We derive, once per micro-batch, a *document id* for every token of a batch::

    input_ids [b, s] --EOS flags--> ordinal of the segment within its row [b, s]
    (seed, step, global sample index) --hash--> row key [b]
    document_ids [b, s] = row_key << ORDINAL_BITS | ordinal

A segment starts at position 0 and at every EOS at position > 0; the EOS belongs to the segment
it starts (the reference convention). Document ids depend only on the data and on the sample's
index in the step's global batch, never on how the batch is split over ranks or micro-batches,
so a pool size hashed from (document id, layer) is the same on one process and on any layout,
and after a resume. Everything here is vectorised, no loop over documents; only
:meth:`TrainingPools.table` reads a data-dependent size (the number of segments), which is why
it runs on the host.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_emo.kernels.routing.segments import segment_ordinals, segment_starts

ORDINAL_BITS = 24
"""Low bits of a document id that hold the segment's ordinal within its row (rows < 16M tokens)."""

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    high, low = constant >> 16, constant & 0xFFFF
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A counter-based 32-bit integer hash (lowbias32 finaliser) of int64 values in [0, 2**32).

    Pure integer arithmetic, so CPU and GPU give identical bits.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_combine(*values) -> torch.Tensor:
    """Hash a sequence of int64 tensors (or ints), broadcast together, into [0, 2**32)."""
    h = None
    for value in values:
        value = torch.as_tensor(value, dtype=torch.int64)
        # Fold 64-bit inputs (document ids) into 32 bits before mixing.
        value = (value & _MASK32) ^ mix32(value >> 32)
        h = mix32(value) if h is None else mix32(h * 31 + value)
    return h


def document_ids(
    input_ids: torch.Tensor,
    eos_token_id: int,
    *,
    seed: int,
    step: int,
    sample_index: torch.Tensor,
) -> torch.Tensor:
    """Identity of the document (router segment) of every token.

    Args:
        input_ids: int ``[b, s]`` token ids, ``s < 2**ORDINAL_BITS``.
        eos_token_id: the id that separates documents.
        seed: the run's routing seed.
        step: the optimizer step this batch belongs to.
        sample_index: int64 ``[b]``, each row's index in the step's *global* batch (over all
            data-parallel ranks and micro-batches), so the ids do not depend on the layout.

    Returns:
        int64 ``[b, s]``: equal ids ⇔ same segment; contiguous along each row.
    """
    if input_ids.shape[1] >= 2**ORDINAL_BITS:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds 2**{ORDINAL_BITS} tokens")
    sample_index = sample_index.to(device=input_ids.device, dtype=torch.int64)
    row_key = hash_combine(seed, step, sample_index)
    return (row_key[:, None] << ORDINAL_BITS) | segment_ordinals(input_ids == eos_token_id)


def segment_index(document_ids: torch.Tensor) -> torch.Tensor:
    """Dense segment index of every token, rows flattened in order.

    A new segment starts at every row start and wherever the id changes, so equal ids in two
    rows never merge.

    Args:
        document_ids: int ``[b, s]``.

    Returns:
        int64 ``[b * s]`` with values ``0 .. num_segments - 1``, non-decreasing.
    """
    return segment_ordinals(segment_starts(document_ids).flatten())


def sample_pool_sizes(document_ids: torch.Tensor, layer_number: int | torch.Tensor, pool_min: int,
                      pool_max: int) -> torch.Tensor:
    """Training pool size of documents in a layer, uniform on [pool_min, pool_max].

    Args:
        document_ids: int64 ids from :func:`document_ids`, any shape.
        layer_number: the MoE layer (each layer draws independently), an int or an int64
            tensor that broadcasts with ``document_ids``.

    Returns:
        int64, the broadcast shape: equal for equal (document, layer).
    """
    span = pool_max - pool_min + 1
    return pool_min + hash_combine(document_ids, layer_number) % span


@dataclass(frozen=True)
class TrainingPools:
    """How a run draws its training pools: a size uniform on [pool_min, pool_max] for every
    document in each of the layers 1 .. num_layers (megatron-core's global layer numbers)."""

    num_layers: int
    pool_min: int
    pool_max: int

    @classmethod
    def of(cls, config) -> Optional["TrainingPools"]:
        """The pools of a model config; None when its routing has none (``topk`` mode, or a
        model without the EMO router)."""
        if getattr(config, "emo_router_mode", "topk") == "topk":
            return None
        return cls(config.num_layers, config.emo_pool_min, config.emo_pool_max)

    def table(self, document_ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[num_layers, N']``: row ``l - 1`` holds layer ``l``'s pool of each of the N
        router segments of ``document_ids [b, s]`` (:func:`segment_index`'s order), the
        ``pool_sizes`` of :func:`megatron_emo.kernels.routing.route` for that layer. ``N'`` is N
        rounded up to even (the last column then unused), so that every row starts 16-byte
        aligned: Triton compiles a kernel variant per pointer alignment.

        One draw for every layer at once, on the host: the router then only selects its row,
        instead of hashing every token in every layer on the device."""
        segment_documents = document_ids.flatten()[segment_starts(document_ids).flatten()]
        layers = torch.arange(1, self.num_layers + 1, device=document_ids.device)
        table = sample_pool_sizes(segment_documents[None, :], layers[:, None], self.pool_min, self.pool_max)
        return torch.nn.functional.pad(table, (0, table.shape[1] % 2))
