"""megatron-core's TransformerLayer, with the document ids handed to the MoE layer.

megatron-core gives the MLP only hidden states, but EMO's router needs the documents. The
document ids ``[b, s]`` travel through ``GPTModel.forward`` as its ``attention_mask`` (our core
attention reads them as document-causal masking); this layer passes the same tensor to the MLP.
"""

from megatron.core.transformer.transformer_layer import TransformerLayer


class EmoTransformerLayer(TransformerLayer):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        hidden_states, context = self._forward_attention(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        mlp_input = self._forward_pre_mlp_layernorm(hidden_states)
        mlp_output_with_bias = self.mlp(mlp_input, document_ids=attention_mask)
        return self._forward_post_mlp(mlp_output_with_bias, residual), context
