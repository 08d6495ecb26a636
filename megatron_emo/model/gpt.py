"""Build the EMO GPTModel: megatron-core's GPTModel with the EMO layer spec and megatron_emo's
fused loss."""

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_emo.config import EmoConfig
from megatron_emo.kernels.cross_entropy import cross_entropy
from megatron_emo.model.spec import emo_block_spec


class EmoGPTModel(GPTModel):
    """megatron-core's GPTModel whose loss reads the bf16 logits in place
    (:func:`megatron_emo.kernels.cross_entropy.cross_entropy`) rather than through an fp32 copy."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token losses ``[b, s]`` of ``logits [s, b, V/tp]`` for ``labels [b, s]``."""
        return cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp).transpose(0, 1).contiguous()


def build_gpt_model(
    config: EmoConfig | TransformerConfig,
    *,
    max_sequence_length: int,
    rotary_base: int,
    share_embeddings: bool = False,
    block_spec: Optional[TransformerBlockSubmodules] = None,
    vocab_size: Optional[int] = None,
    vp_stage: Optional[int] = None,
) -> EmoGPTModel:
    """One pipeline stage of the model (or virtual stage ``vp_stage`` of it), on the CPU (move it
    with ``.cuda()``).

    The vocabulary is ``config.emo_vocab_size`` (already padded); RoPE over the full head.
    ``block_spec`` and ``vocab_size`` replace the EMO layers and the config's vocabulary (for
    baseline models in benchmarks).
    """
    return EmoGPTModel(
        config=config,
        transformer_layer_spec=block_spec or emo_block_spec(config, vp_stage),
        vocab_size=vocab_size or config.emo_vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=share_embeddings,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )


def build_model_chunks(config: EmoConfig, **kwargs) -> list[EmoGPTModel]:
    """This rank's model chunks: its pipeline stage, or one chunk per virtual stage under the
    interleaved schedule (``virtual_pipeline_model_parallel_size``). ``kwargs`` as
    :func:`build_gpt_model`."""
    virtual_stages = config.virtual_pipeline_model_parallel_size
    if virtual_stages is None:
        return [build_gpt_model(config, **kwargs)]
    return [build_gpt_model(config, vp_stage=stage, **kwargs) for stage in range(virtual_stages)]
