"""Per-GPU memory of a training run on a parallel layout: weights, gradients, optimizer states
and activations, for every pipeline stage.

Counted is what torch's caching allocator hands out (compare with
``torch.cuda.max_memory_allocated``); the CUDA context, NCCL buffers and fragmentation are left
to a reserve. Training as megatron_emo runs it on GPU: bf16 weights (megatron-core's
Float16Module), DistributedDataParallel with fp32 gradient buffers, megatron-core's
DistributedOptimizer.

Legend: h hidden, n heads, g query groups, d head width, E routed experts, E_p = ceil(E/EP)·EP
allocated, K routed top-k, F expert width, F_s = shared experts · F, V padded vocabulary,
b micro-batch, s sequence length / CP, T = b·s tokens, T_sp = T/TP under sequence parallelism
(else T), N = T·K routed rows, a = 2 bytes per activation element (4 without bf16).

States, bytes per parameter a rank holds::

    weights      2          bf16
    gradients    4          fp32 main gradients (the whole DDP buffer; ZeRO-1 keeps it)
    optimizer    12 / D     fp32 master weights, Adam m and v, sharded by the distributed
                            optimizer over D = DP·CP = world/(TP·PP) ranks for dense parameters
                            and D = expert DP = world/(PP·EP·ETP) for the routed experts

The optimizer step adds nothing that counts: torch's fused AdamW updates in place, and the
gradient clipping's norms are one scalar per tensor.

Parameters of one layer on one rank: norms 2h; attention h·(n + 2g)·d/TP + n·d·h/TP; router E·h;
shared expert 3·h·F_s/TP; routed experts 3·h·(F/ETP)·E_p/EP (the padding experts are allocated).
First stage: the embedding V·h/TP; last stage: the final norm h and the output layer V·h/TP
(none when tied to the embedding without a pipeline).

Activations one layer saves for backward, one micro-batch, bytes::

    norms           2 · (a·h + 4)·T_sp    each RMSNorm keeps its input and fp32 1/rms
    attention       a·h·T_sp              QKV input (gathered again in backward under SP)
                  + a·(n + 2g)d·T/TP      QKV output (the V view keeps it)
                  + a·(n + g)d·T/TP       q and k after RoPE
                  + a·n·d·T/TP            output-projection input
    core attention  a·n·d·T/TP            SDPA output
                  + 4n·T/TP               its log-sum-exp (documents are cu_seqlens: no mask)
    router          4h·T_sp               fp32 copy of its input
                  + (4E + 12K + 4)·T      probabilities, indices (int64), gate weights and
                                          log-sum-exp of every token (the logits are gathered)
    routed experts  (a·h + 3a·F/ETP)·N    the experts' input rows, gate|up and SwiGLU output
                  + (a·h + 8)·N           the combined expert rows and the permutation order
                  + 16·N  (EP > 1)        the dispatch's two sort orders
    shared expert   a·h·T_sp              fc1 input
                  + 5a·F_s·T/TP           fc1 output, SiLU, up + offset, fc2 input

Recomputation (megatron-core's ``recompute_granularity``): ``selective`` recomputes the modules
in ``recompute_modules``, of which megatron_emo's layers honour ``core_attn``: the core-attention
rows are not stored. ``full`` keeps only each recompute unit's input, a·h·T_sp: ``uniform``
makes units of ``recompute_num_layers`` layers, ``block`` recomputes the first
``recompute_num_layers`` layers of every model chunk one by one and stores the others.

Last stage, one micro-batch: final norm (a·h + 4)·T_sp, output-layer input a·h·T_sp,
cross-entropy a·T·V/TP + 12·T (the fused loss keeps the logits, whose gradient it writes over
them, and each token's fp32 log-sum-exp and int64 target).

Pipeline: model chunks held at once on stage r with M micro-batches per step: 1 without a
pipeline; min(PP − r, M) with 1F1B; min(2(PP − r − 1) + (v − 1)·G + 1, M·v) interleaved over v
virtual stages (G = ``microbatch_group_size_per_vp_stage``). Each held micro-batch also keeps
its received input a·h·T_sp (stage > 0) and sent output a·h·T_sp (stage < last, unless
``deallocate_pipeline_outputs``).

Working memory at the backward peak, the larger of two phases that never overlap (the loss
gradient, written over the logits, is freed when the output layer's backward ends, before any
layer's backward begins):
- the output layer's backward (last stage): the LM head's activations above and its weight's
  bf16 gradient a·V·h/TP;
- a layer's backward: the gradients of the layer, about as large as what it saves without
  recomputation; what recomputation rebuilds (full: one unit's layers, selective: one layer's
  core attention); the largest parameter's bf16 gradient before DDP adds it into the fp32
  buffer (the routed experts' gradients are added in the GEMM, but autograd still gets a tensor
  of the weight's size for DDP's hook).

Assumes balanced experts (each EP rank receives as many rows as it sends; EMO's load-balancing
loss keeps training close to that). A run is checked as training checks it
(:mod:`megatron_emo.validate`), and for what these formulas cover.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_emo.config import ConfigError, EmoConfig
from megatron_emo.data.tokenizer import EOS_ID
from megatron_emo.parallel.layout import ExpertLayout, data_parallel_size
from megatron_emo.recipes import RunConfig
from megatron_emo.validate import check_estimable, check_world, validate_run

RECOMPUTE_SETTINGS = ("none", "selective", "full")
GiB = 2**30


@dataclass(frozen=True)
class Layout:
    """The parallel layout and batch of a run, as one rank sees it."""

    world_size: int
    tp: int
    pp: int
    vp: Optional[int]
    cp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    sequence_parallel: bool
    micro_batch_size: int
    seq_length: int
    num_microbatches: int

    def describe(self) -> str:
        vp = f" (v {self.vp})" if self.vp else ""
        return (
            f"TP {self.tp} · PP {self.pp}{vp} · CP {self.cp} · DP {self.dp}; EP {self.ep} · ETP "
            f"{self.etp} · expert DP {self.expert_dp}; sequence parallel "
            f"{'on' if self.sequence_parallel else 'off'}; micro-batch {self.micro_batch_size} × "
            f"{self.seq_length} tokens, {self.num_microbatches} micro-batches per step"
        )


@dataclass(frozen=True)
class StageMemory:
    """Bytes one GPU of a pipeline stage holds.

    ``activations`` maps each recompute setting (none, selective, full) to the activation peak:
    what the held micro-batches store plus the backward's working memory.
    """

    stage: int
    layers: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: dict

    def total(self, recompute: str) -> int:
        """Peak of the step: the states plus the activations."""
        return self.weights + self.grads + self.optimizer + self.activations[recompute]


@dataclass(frozen=True)
class MemoryEstimate:
    recipe: str
    layout: Layout
    recompute: str
    """The run's recompute setting: what ``total`` and the fit check use."""
    model_params: int
    """Parameters of the one-process model (real experts only)."""
    padding_params: int
    """Parameters of the padding experts over all layers (allocated, never trained)."""
    layer_activations: dict
    """Bytes one layer stores for one micro-batch without recomputation, by part."""
    stages: list

    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total(self.recompute))

    def refusal(self, gpu_memory: int, reserve: int) -> Optional[str]:
        """Why the run does not fit GPUs of ``gpu_memory`` bytes keeping ``reserve`` free, or
        None when it fits."""
        stage = self.worst()
        need, room = stage.total(self.recompute), gpu_memory - reserve
        if need <= room:
            return None
        states = stage.weights + stage.grads + stage.optimizer
        reason = (
            f"pipeline stage {stage.stage} needs {need / GiB:.1f} GiB per GPU (weights "
            f"{stage.weights / GiB:.1f}, gradients {stage.grads / GiB:.1f}, optimizer states "
            f"{stage.optimizer / GiB:.1f}, activations {stage.activations[self.recompute] / GiB:.1f} "
            f"with recompute {self.recompute}) but {gpu_memory / GiB:.0f} GiB less a "
            f"{reserve / GiB:.0f} GiB reserve leaves {room / GiB:.1f}: "
        )
        if states > room:
            return reason + (
                "the parameter states alone do not fit; spread them over more GPUs (raise "
                "model.expert_model_parallel_size, the data-parallel size, or "
                "model.pipeline_model_parallel_size)"
            )
        full = stage.total("full")
        return reason + (
            "lower data.micro_batch_size, or recompute activations (model.recompute_granularity="
            "full, model.recompute_method=uniform, model.recompute_num_layers=1 needs "
            f"{full / GiB:.1f} GiB), or add pipeline stages"
        )

    def to_json(self) -> dict:
        return {
            "recipe": self.recipe,
            "layout": dataclasses.asdict(self.layout),
            "recompute": self.recompute,
            "model_params": self.model_params,
            "padding_params": self.padding_params,
            "layer_activation_bytes": self.layer_activations,
            "stages": [
                {**dataclasses.asdict(stage), "total": stage.total(self.recompute)} for stage in self.stages
            ],
        }


def _layout(run: RunConfig, config: EmoConfig, world_size: int) -> Layout:
    """Check that ``world_size`` GPUs can run ``run`` and describe the layout; ConfigError names
    the first broken constraint."""
    validate_run(run)
    check_world(run, config, world_size, on_gpu=True)
    check_estimable(config)
    tp, pp, cp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    dp = data_parallel_size(config, world_size)
    data = run.data
    num_microbatches = data.global_batch_size // (data.micro_batch_size * dp)
    vp = config.virtual_pipeline_model_parallel_size if pp > 1 else None
    return Layout(
        world_size=world_size, tp=tp, pp=pp, vp=vp, cp=cp, ep=ep, etp=etp, dp=dp,
        expert_dp=world_size // (pp * ep * etp), sequence_parallel=config.sequence_parallel,
        micro_batch_size=data.micro_batch_size, seq_length=data.seq_length, num_microbatches=num_microbatches,
    )


def stage_layers(config) -> list[int]:
    """Transformer layers on every pipeline stage, by megatron-core's own split rule."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    pp, vp = config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size
    try:
        return [
            sum(get_num_layers_to_build(config, vp_stage=v if vp else None, pp_rank=rank) for v in range(vp or 1))
            for rank in range(pp)
        ]
    except AssertionError as error:
        raise ConfigError(
            f"num_layers={config.num_layers} cannot be split over pipeline_model_parallel_size={pp}"
            f"{f' x virtual_pipeline_model_parallel_size={vp}' if vp else ''} stages: {error}"
        ) from error


def layer_params(config, *, tp: int, ep: int, etp: int) -> tuple[int, int]:
    """``(dense, routed-expert)`` parameters of one layer on one rank of a TP/EP/ETP layout
    (1, 1, 1: the one-process model)."""
    h, d = config.hidden_size, config.kv_channels
    n, g = config.num_attention_heads, config.num_query_groups
    shared = config.emo_num_shared_experts * config.moe_ffn_hidden_size
    dense = 2 * h + h * (n + 2 * g) * d // tp + n * d * h // tp + config.num_routed_experts * h + 3 * h * shared // tp
    experts = ExpertLayout(config.num_routed_experts, ep)
    return dense, 3 * h * (config.moe_ffn_hidden_size // etp) * experts.num_local


def _element_bytes(config) -> int:
    """Bytes of an activation element (and of a weight): bf16, or fp32 without it."""
    return 2 if config.bf16 else 4


def _tokens(layout: Layout) -> tuple[int, int]:
    """``(T, T_sp)``: a micro-batch's tokens on one rank, and those in sequence-split regions."""
    tokens = layout.micro_batch_size * layout.seq_length // layout.cp
    return tokens, tokens // layout.tp if layout.sequence_parallel else tokens


def layer_activations(config, layout: Layout) -> dict:
    """Bytes one layer stores for one micro-batch without recomputation, by part (formulas in
    the module docstring)."""
    a = _element_bytes(config)
    h, d, tp = config.hidden_size, config.kv_channels, layout.tp
    n, g = config.num_attention_heads, config.num_query_groups
    tokens, tokens_sp = _tokens(layout)
    experts, topk = config.num_routed_experts, config.routed_topk
    rows = tokens * topk
    ffn = config.moe_ffn_hidden_size // layout.etp
    shared = config.emo_num_shared_experts * config.moe_ffn_hidden_size
    return {
        "norms": 2 * (a * h + 4) * tokens_sp,
        "attention": a * h * tokens_sp + a * ((n + 2 * g) + (n + g) + n) * d * tokens // tp,
        "core attention": (a * n * d + 4 * n) * tokens // tp,
        "router": 4 * h * tokens_sp + (4 * experts + 12 * topk + 4) * tokens,
        "routed experts": (a * h + 3 * a * ffn) * rows + (a * h + 8) * rows + (16 * rows if layout.ep > 1 else 0),
        "shared expert": a * h * tokens_sp + 5 * a * shared * tokens // tp,
    }


def _chunks_held(config, layout: Layout, rank: int) -> int:
    """Model chunks × micro-batches whose activations stage ``rank`` holds at its peak."""
    if layout.pp == 1:
        return 1
    if layout.vp is None:
        return min(layout.pp - rank, layout.num_microbatches)
    group = config.microbatch_group_size_per_vp_stage or layout.pp
    warmup = 2 * (layout.pp - rank - 1) + (layout.vp - 1) * group
    return min(warmup + 1, layout.num_microbatches * layout.vp)


def _full_recompute(config, layer: int, unit_input: int, chunk_layers: int) -> tuple[int, int]:
    """``(stored per model chunk, rebuilt in backward)`` under full recomputation: the run's
    method, or uniform units of one layer when the run does not recompute fully."""
    units = config.recompute_num_layers or 1
    if config.recompute_granularity == "full" and config.recompute_method == "block":
        recomputed = min(units, chunk_layers)
        return recomputed * unit_input + (chunk_layers - recomputed) * layer, layer if recomputed else 0
    return math.ceil(chunk_layers / units) * unit_input, min(units, chunk_layers) * layer


def _activation_peaks(config, layout: Layout, parts: dict, rank: int, layers: int, largest_param: int) -> dict:
    """Activation peak of stage ``rank`` for every recompute setting (bytes)."""
    a = _element_bytes(config)
    tokens, tokens_sp = _tokens(layout)
    unit_input = a * config.hidden_size * tokens_sp
    chunk_layers = layers // (layout.vp or 1)
    layer, core = sum(parts.values()), parts["core attention"]
    held = _chunks_held(config, layout, rank)
    io = unit_input * ((rank > 0) + (rank < layout.pp - 1 and not config.deallocate_pipeline_outputs))
    lm_head_backward = 0
    if rank == layout.pp - 1:
        final_norm_and_head_input = (2 * a * config.hidden_size + 4) * tokens_sp
        logits_and_loss = a * tokens * config.emo_vocab_size // layout.tp + 12 * tokens
        weight_grad = a * config.emo_vocab_size * config.hidden_size // layout.tp
        lm_head_backward = final_norm_and_head_input + logits_and_loss + weight_grad
    # (stored per model chunk, rebuilt by recomputation in backward)
    per_chunk = {
        "none": (chunk_layers * layer, 0),
        "selective": (chunk_layers * (layer - core), core),
        "full": _full_recompute(config, layer, unit_input, chunk_layers),
    }
    # Beyond what is stored, the larger backward phase (module docstring).
    return {
        setting: held * (stored + io) + max(lm_head_backward, layer + rebuilt + a * largest_param)
        for setting, (stored, rebuilt) in per_chunk.items()
    }


def estimate_memory(run: RunConfig, *, world_size: int, vocab_size: int) -> MemoryEstimate:
    """Per-GPU memory of ``run`` on ``world_size`` GPUs, every pipeline stage.

    Args:
        run: the recipe with its overrides (layout fields in ``run.model``).
        world_size: GPUs of the job.
        vocab_size: the tokenizer's vocabulary (padded here as training pads it).

    Raises:
        ConfigError: the layout is impossible (the message names the constraint).
    """
    # As training builds it on GPU (bf16 unless the run says otherwise), the vocabulary padded
    # as training pads it; the EOS id (this package's) changes nothing here.
    config = run.emo_config(vocab_size=run.model_vocab_size(vocab_size), eos_token_id=EOS_ID, on_gpu=True)
    layout = _layout(run, config, world_size)
    layers_per_stage = stage_layers(config)
    dense_layer, expert_layer = layer_params(config, tp=layout.tp, ep=layout.ep, etp=layout.etp)
    h, vocab, tp = config.hidden_size, config.emo_vocab_size, layout.tp
    tied_single_stage = run.gpt.share_embeddings and layout.pp == 1
    parts = layer_activations(config, layout)
    weight_bytes = _element_bytes(config)
    # bf16 training keeps an fp32 master copy besides Adam's two moments.
    optimizer_bytes = 12 if config.bf16 else 8
    n, g, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    # The routed experts' fc1 (2/3 of their parameters) or the attention's QKV.
    largest_layer_param = max(expert_layer // 3 * 2, h * (n + 2 * g) * d // tp)
    stages = []
    for rank, layers in enumerate(layers_per_stage):
        first, last = rank == 0, rank == layout.pp - 1
        embedding = vocab * h // tp if first else 0
        head = (h + (0 if tied_single_stage else vocab * h // tp)) if last else 0
        dense = layers * dense_layer + embedding + head
        experts = layers * expert_layer
        sharded = dense / (layout.dp * layout.cp) + experts / layout.expert_dp
        largest = max(largest_layer_param, vocab * h // tp if first or last else 0)
        stages.append(StageMemory(
            stage=rank,
            layers=layers,
            params=dense + experts,
            weights=weight_bytes * (dense + experts),
            grads=4 * (dense + experts),
            optimizer=int(optimizer_bytes * sharded),
            activations=_activation_peaks(config, layout, parts, rank, layers, largest),
        ))
    padding = ExpertLayout(config.num_routed_experts, layout.ep).num_padded - config.num_routed_experts
    return MemoryEstimate(
        recipe=run.name,
        layout=layout,
        recompute=config.recompute_granularity or "none",
        model_params=config.num_layers * sum(layer_params(config, tp=1, ep=1, etp=1))
        + vocab * h * (1 if run.gpt.share_embeddings else 2) + h,
        padding_params=config.num_layers * 3 * h * config.moe_ffn_hidden_size * padding,
        layer_activations=parts,
        stages=stages,
    )
