"""The benchmark's cases: a name, what it is, how to build its model, and what it patches."""

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_emo.benchmark import models
from megatron_emo.model.gpt import build_gpt_model
from megatron_emo.recipes import RunConfig


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[RunConfig, int, int, bool], tuple[GPTModel, TransformerConfig]]
    """(run, vocab size, EOS id, on GPU) → the bare model (weights not initialised) and its config."""
    patch: Callable[[], ContextManager] = contextlib.nullcontext
    """Entered around the case's steps."""
    info: dict = field(default_factory=dict)
    """Facts recorded with the case's results."""


def _emo_config(run: RunConfig, vocab_size: int, eos_id: int, on_gpu: bool, **model):
    run = copy.deepcopy(run)
    # The benchmark draws the weights on the device afterwards (benchmark.runner): the
    # trainer's CPU initialisation of billions of parameters would take minutes per case.
    run.model.update(perform_initialization=False, **model)
    return run.emo_config(vocab_size=vocab_size, eos_token_id=eos_id, on_gpu=on_gpu)


def _build(run: RunConfig, config, **kwargs) -> GPTModel:
    return build_gpt_model(config, max_sequence_length=run.data.seq_length, rotary_base=run.gpt.rotary_base,
                           share_embeddings=run.gpt.share_embeddings, **kwargs)


def emo_model(router_mode: str):
    def build(run, vocab_size, eos_id, on_gpu):
        config = _emo_config(run, vocab_size, eos_id, on_gpu, emo_router_mode=router_mode)
        return _build(run, config), config

    return build


def _baseline(make_config, make_block):
    def build(run, vocab_size, eos_id, on_gpu):
        config = make_config(_emo_config(run, vocab_size, eos_id, on_gpu))
        return _build(run, config, block_spec=make_block(config), vocab_size=vocab_size), config

    return build


MCORE_EXPERTS = models.mcore_experts()

CASES = {
    "emo": Case("emo", "EMO: document-pooled router, our MoE layer (fused kernels where present)",
                emo_model("emo")),
    "topk": Case("topk", "the same model with plain top-k routing (no pool)", emo_model("topk")),
    "mcore-moe": Case(
        "mcore-moe",
        f"megatron-core's MoELayer: TopKRouter, alltoall dispatcher, {MCORE_EXPERTS} experts "
        "(no TransformerEngine; moe_utils.te_general_gemm set to None)",
        _baseline(models.mcore_moe_config, models.mcore_moe_block),
        info={"mcore_experts": MCORE_EXPERTS, "transformer_engine": models.HAVE_TE},
    ),
    "dense": Case("dense", "dense SwiGLU MLP as wide as the active experts (same FLOPs per token, no router)",
                  _baseline(models.dense_config, models.dense_block)),
}
"""The cases the package defines; tools/benchmark_throughput.py adds ``loop-router``."""


def init_weights(model: torch.nn.Module, std: float) -> None:
    """Every matrix from N(0, std), on whatever device the model is: the distribution of the
    trainer's initialisation (EMO: one normal for every linear layer and the embeddings); norm
    weights keep their ones."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
