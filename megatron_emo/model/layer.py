"""megatron-core's TransformerLayer, with the micro-batch's documents handed to the MoE layer.

The documents (a :class:`~megatron_emo.model.document_batch.DocumentBatch`) reach every layer as
megatron-core's ``packed_seq_params``, which it passes to core attention only. The one argument
megatron-core 0.16.1 passes from ``TransformerLayer.forward`` to the MLP is ``padding_mask``
(in ``_forward_mlp``, whether the MLP is recomputed or not), so this layer puts the
DocumentBatch there; megatron-core's forward runs unchanged, with every option it honours.
tests/model/test_layer.py fails the day megatron-core stops passing ``padding_mask`` through.
"""

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_emo.model.document_batch import DocumentBatch


class EmoTransformerLayer(TransformerLayer):
    def forward(self, *args, packed_seq_params=None, padding_mask=None, **kwargs):
        if padding_mask is not None:
            raise NotImplementedError("padding masks are not supported: documents come as a DocumentBatch")
        if not isinstance(packed_seq_params, DocumentBatch):
            raise TypeError("an EMO layer needs its micro-batch's DocumentBatch as packed_seq_params "
                            "(megatron_emo.model.document_batch.run_model passes it)")
        return super().forward(*args, packed_seq_params=packed_seq_params, padding_mask=packed_seq_params, **kwargs)
