"""The checks of a run's settings, each rule written once here; every one raises ConfigError
naming the field and the way out.

    check_model(config)                     an EmoConfig's EMO fields (EmoConfig runs it when built)
    model_value(model, name, value)         one field of a run's model section: an EmoConfig field, of its type
    checked_value(dotted, value, current)   a value against the type of its field
    check_gpt(gpt)                          the GPTModel settings (gpt section)
    validate_run(run)                       the data, gpt, optim and train sections
    validate_training_run(run)              all a training run is checked for before any work
    check_layout(config, world_size)        the parallel layout against the number of ranks
    check_world(run, config, world_size, on_gpu)   the layout, batch and saving on that many ranks
    check_estimable(config)                 what the memory estimator's formulas cover
"""

import difflib
import importlib.util
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from megatron_emo.config import MODEL_DEFAULTS, ConfigError, EmoConfig
from megatron_emo.data.tokenizer import EOS_ID
from megatron_emo.parallel.layout import data_parallel_size

if TYPE_CHECKING:
    from megatron_emo.recipes import RunConfig

ROUTER_MODES = ("emo", "topk")

UNSUPPORTED_MEGATRON_OPTIONS = {
    "attention_dropout": "the variable-length flash attention kernel has no dropout",
    "mlp_chunks_for_prefill": "the MoE layer needs the whole micro-batch's documents",
    "fused_single_qkv_rope": "megatron-core does not fuse it with packed-sequence parameters",
    "cuda_graph_impl": "megatron-core's CUDA graphs exclude packed-sequence parameters",
    "cross_entropy_loss_fusion": "megatron_emo's fused loss (kernels/cross_entropy) takes its place",
}
"""megatron-core fields that EMO's layers do not honour, and why: each must keep its EmoConfig
default, the one value that works."""

DEMO_MAX_TRAIN_TOKENS = 100_000_000
"""The demo corpus holds about 0.6M tokens: a run that plans more than this (some 170 passes
over it) is a real pretraining run that was not given its data."""


# ---------------------------------------------------------------------------------------------
# The model


def check_model(config: EmoConfig) -> None:
    """Raise ConfigError for the first EMO field of ``config`` that cannot work."""
    if not config.gated_linear_unit or config.add_bias_linear:
        raise ConfigError(
            f"gated_linear_unit={config.gated_linear_unit}, add_bias_linear="
            f"{config.add_bias_linear}: EMO's experts are gated (SwiGLU) and have no biases; "
            "leave both at their defaults"
        )
    if config.emo_router_mode not in ROUTER_MODES:
        raise ConfigError(f"emo_router_mode={config.emo_router_mode!r} is unknown: use one of {ROUTER_MODES}")
    if config.num_moe_experts is None or config.num_moe_experts < 1:
        raise ConfigError(
            f"num_moe_experts={config.num_moe_experts}: an EMO model needs experts in every "
            "layer; set num_moe_experts (EMO: 128)"
        )
    if not 0 <= config.emo_num_shared_experts < config.num_moe_experts:
        raise ConfigError(
            f"emo_num_shared_experts={config.emo_num_shared_experts} must be in "
            f"[0, num_moe_experts={config.num_moe_experts}): at least one expert must be routed; "
            "lower emo_num_shared_experts (EMO: 1)"
        )
    if not 1 <= config.routed_topk <= config.num_routed_experts:
        raise ConfigError(
            f"moe_router_topk={config.moe_router_topk} leaves {config.routed_topk} routed choices "
            f"per token (after {config.emo_num_shared_experts} shared); it must be in "
            f"[1, {config.num_routed_experts}] routed experts: set moe_router_topk to between "
            f"{config.emo_num_shared_experts + 1} and {config.num_moe_experts}"
        )
    if config.emo_pool_min > config.emo_pool_max:
        raise ConfigError(
            f"emo_pool_min={config.emo_pool_min} > emo_pool_max={config.emo_pool_max}: "
            "lower emo_pool_min or raise emo_pool_max"
        )
    for name in ("emo_pool_min", "emo_eval_pool"):
        pool = getattr(config, name)
        if pool is not None and pool < config.routed_topk:
            raise ConfigError(
                f"{name}={pool} is smaller than the routed top-k ({config.routed_topk} = "
                f"moe_router_topk {config.moe_router_topk} - emo_num_shared_experts "
                f"{config.emo_num_shared_experts}): a pool must hold every expert a token "
                f"picks; raise {name} to at least {config.routed_topk}"
            )
    if config.emo_vocab_size < 1:
        raise ConfigError(
            f"emo_vocab_size={config.emo_vocab_size} must be positive: the tokenizer's (padded) vocabulary"
        )
    if not 0 <= config.emo_eos_token_id < config.emo_vocab_size:
        raise ConfigError(
            f"emo_eos_token_id={config.emo_eos_token_id} is outside the vocabulary "
            f"[0, {config.emo_vocab_size}): use the tokenizer's EOS id"
        )
    for name in ("emo_lb_loss_weight", "emo_z_loss_weight"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}={getattr(config, name)} must be >= 0 (0 turns the loss off)")
    for name, why in UNSUPPORTED_MEGATRON_OPTIONS.items():
        supported = MODEL_DEFAULTS[name]
        if getattr(config, name) != supported:
            raise ConfigError(f"{name}={getattr(config, name)!r} is not supported ({why}): leave it at {supported!r}")


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean a, b?)`` for the names of ``valid`` close to ``name``, else empty."""
    close = difflib.get_close_matches(name, sorted(valid), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def checked_value(dotted: str, value: Any, current: Any) -> Any:
    """``value`` for field ``dotted`` (``section.field``) whose value now is ``current``: of its
    type (an int stands for a float); None on either side is not checked."""
    if current is None or value is None:
        return value
    if isinstance(current, bool) != isinstance(value, bool):
        raise ConfigError(f"{dotted}: expected a boolean like {current!r}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(current)):
        raise ConfigError(f"{dotted}: expected {type(current).__name__} like {current!r}, got {value!r}")
    return value


def model_value(model: Mapping[str, Any], name: str, value: Any) -> Any:
    """``value`` checked for field ``name`` of the model section ``model``: an EmoConfig field
    (a close match is suggested), of the type of its value in ``model``, else of its default."""
    if name not in MODEL_DEFAULTS:
        raise ConfigError(f"model.{name} is not an EmoConfig field{did_you_mean(name, MODEL_DEFAULTS)} "
                          "(EMO's fields: megatron_emo/config.py; the rest are megatron-core's TransformerConfig)")
    return checked_value(f"model.{name}", value, model.get(name, MODEL_DEFAULTS[name]))


# ---------------------------------------------------------------------------------------------
# The run's other sections


def check_gpt(gpt) -> None:
    """The GPTModel settings: a run's gpt section, or a conversion's GPTSettings."""
    if gpt.rotary_base <= 0:
        raise ConfigError(f"gpt.rotary_base={gpt.rotary_base} must be positive: it is RoPE's base")


def validate_run(run: "RunConfig") -> None:
    """Checks of the run sections (the model is checked when its EmoConfig is built)."""
    data, optim, train = run.data, run.optim, run.train
    for entry in data.blend:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (int, float))
                and entry[0] > 0 and isinstance(entry[1], str)):
            raise ConfigError(
                f"data.blend entry {entry!r} is not [weight > 0, 'dataset prefix'], e.g. "
                "data.blend=[[0.7,'data/web'],[0.3,'data/code']]"
            )
    if data.blend and not data.tokenizer_model:
        raise ConfigError("data.blend needs data.tokenizer_model, the tokenizer the datasets were made with")
    if data.seq_length < 2:
        raise ConfigError(f"data.seq_length={data.seq_length} must be at least 2")
    if data.micro_batch_size < 1 or data.global_batch_size % data.micro_batch_size:
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size} must be a positive multiple of "
            f"data.micro_batch_size={data.micro_batch_size}"
        )
    check_gpt(run.gpt)
    if train.steps < 1:
        raise ConfigError(f"train.steps={train.steps} must be at least 1")
    if not 0 <= optim.warmup_steps < train.steps:
        raise ConfigError(
            f"optim.warmup_steps={optim.warmup_steps} must be in [0, train.steps={train.steps}): "
            "the learning rate must decay after the warm-up; lower optim.warmup_steps"
        )
    if optim.schedule not in ("cosine", "wsd"):
        raise ConfigError(f"optim.schedule={optim.schedule!r} must be 'cosine' or 'wsd'")
    if optim.schedule == "wsd" and not 0 < optim.anneal_steps <= train.steps - optim.warmup_steps:
        raise ConfigError(
            f"optim.anneal_steps={optim.anneal_steps} must be in [1, train.steps - optim.warmup_steps = "
            f"{train.steps - optim.warmup_steps}] for the wsd schedule"
        )
    if not 0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"optim.min_lr={optim.min_lr} must be in [0, optim.lr={optim.lr}]")
    if train.save_interval < 1 or train.keep_last < 1 or train.keep_every < 0:
        raise ConfigError(
            f"train.save_interval={train.save_interval} and train.keep_last={train.keep_last} must "
            f"be at least 1, train.keep_every={train.keep_every} at least 0"
        )
    if train.eval_interval < 0 or train.eval_samples < data.micro_batch_size:
        raise ConfigError(
            f"train.eval_interval={train.eval_interval} must be >= 0 and train.eval_samples="
            f"{train.eval_samples} at least data.micro_batch_size={data.micro_batch_size}"
        )
    if train.nan_policy not in ("skip", "stop") or train.max_nan_skips < 0:
        raise ConfigError(
            f"train.nan_policy={train.nan_policy!r} must be 'skip' or 'stop' and "
            f"train.max_nan_skips={train.max_nan_skips} at least 0"
        )
    if train.log_interval < 1:
        raise ConfigError(f"train.log_interval={train.log_interval} must be at least 1")
    if train.wandb_project is not None and not train.wandb_project:
        raise ConfigError("train.wandb_project='' must name a Weights & Biases project, or be None (off)")
    # Found (not imported) here, so a missing package fails before any work, on every rank.
    if train.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"train.wandb_project={train.wandb_project!r} needs the wandb package: pip install wandb "
            "(or leave train.wandb_project=None)"
        )


def validate_training_run(run: "RunConfig") -> None:
    """Everything a training run is checked for before any work (``--print-config`` too): the run
    sections, the model fields (with a stand-in tokenizer: the demo's vocabulary and this
    package's EOS id, as the real one is read later), and data for the run's length. The checks
    that need the world size: :func:`check_world`."""
    validate_run(run)
    planned_tokens = run.train.steps * run.data.global_batch_size * run.data.seq_length
    if not run.data.blend and planned_tokens > DEMO_MAX_TRAIN_TOKENS:
        raise ConfigError(
            f"data.blend is empty, so run {run.name!r} would train on the small demo corpus (about 0.6M tokens), "
            f"but it plans {planned_tokens:.3g} tokens ({run.train.steps} steps of {run.data.global_batch_size} x "
            f"{run.data.seq_length}): give it its data with data.blend and data.tokenizer_model (README: Data)"
        )
    run.emo_config(vocab_size=run.model_vocab_size(run.data.demo_vocab_size), eos_token_id=EOS_ID,
                   on_gpu=torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------
# The run on a number of ranks


def check_layout(config: EmoConfig, world_size: int) -> None:
    """Raise ConfigError naming the first constraint ``world_size`` ranks of ``config`` break.

    The layout fields are megatron-core's: tensor/pipeline/context/expert model-parallel sizes,
    expert tensor parallel size, sequence_parallel. Heads and query groups against TP are
    checked by megatron-core when the config is built.
    """
    tp, pp, cp = (
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        config.context_parallel_size,
    )
    ep, etp = config.expert_model_parallel_size, config.expert_tensor_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"{world_size} ranks cannot hold tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp} x context_parallel_size={cp}: launch a multiple "
            f"of {tp * pp * cp} ranks or change the layout"
        )
    if cp != 1:
        raise ConfigError(
            f"context_parallel_size={cp}: context parallelism is not supported yet (the "
            "document-causal attention does not split sequences); set context_parallel_size=1 "
            "and split tokens with sequence_parallel=True and tensor parallelism instead"
        )
    if etp != tp:
        raise ConfigError(
            f"expert_tensor_parallel_size={etp} differs from tensor_model_parallel_size={tp}: "
            "megatron_emo splits experts over the tensor-parallel group only; leave "
            "expert_tensor_parallel_size unset (it defaults to tensor_model_parallel_size)"
        )
    if (world_size // pp) % (ep * etp):
        raise ConfigError(
            f"expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} does not "
            f"divide the {world_size // pp} ranks of a pipeline stage: choose EP so that "
            f"EP x ETP divides world / pipeline_model_parallel_size"
        )
    # (ETP = TP, so this also splits the shared experts, whose width is a multiple of it.)
    if config.moe_ffn_hidden_size % etp:
        raise ConfigError(
            f"moe_ffn_hidden_size={config.moe_ffn_hidden_size} is not divisible by "
            f"expert_tensor_parallel_size={etp}: choose a tensor-parallel size dividing it"
        )
    stage_layers = (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage)
    vp = config.virtual_pipeline_model_parallel_size or 1
    if pp > 1 and stage_layers == (None, None) and config.num_layers % (pp * vp):
        raise ConfigError(
            f"num_layers={config.num_layers} cannot be split evenly over "
            f"pipeline_model_parallel_size={pp} x virtual_pipeline_model_parallel_size={vp} "
            "stages: choose stages dividing the layers, or set num_layers_in_first_pipeline_stage / "
            "num_layers_in_last_pipeline_stage for an uneven split"
        )
    if vp > 1 and pp == 1:
        raise ConfigError(
            f"virtual_pipeline_model_parallel_size={vp} needs pipeline parallelism: set "
            "pipeline_model_parallel_size > 1 or leave virtual_pipeline_model_parallel_size unset"
        )


def check_world(run: "RunConfig", config: EmoConfig, world_size: int, *, on_gpu: bool) -> None:
    """Raise ConfigError for the first setting of ``run`` (its model built as ``config``) that
    ``world_size`` ranks (GPUs when ``on_gpu``) cannot run: the layout (:func:`check_layout`),
    asynchronous saving, the global batch over the data-parallel ranks, the sequence over the
    sequence-parallel ranks, the interleaved schedule's micro-batches."""
    check_layout(config, world_size)
    if run.train.async_save and not on_gpu:
        raise ConfigError("train.async_save needs a GPU (on the CPU the state would change while it is written): "
                          "set train.async_save=False")
    data = run.data
    dp = data_parallel_size(config, world_size)
    per_step = data.micro_batch_size * dp
    if data.global_batch_size % per_step:
        raise ConfigError(
            f"data.global_batch_size={data.global_batch_size} is not a multiple of data.micro_batch_size x "
            f"data-parallel size = {data.micro_batch_size} x {dp}: make it a multiple of {per_step}, or change "
            "data.micro_batch_size or the layout"
        )
    tp = config.tensor_model_parallel_size
    if config.sequence_parallel and data.seq_length % tp:
        raise ConfigError(
            f"data.seq_length={data.seq_length} does not split over the tensor-parallel size {tp} (sequence "
            f"parallel): make it a multiple of {tp}, or set model.sequence_parallel=False"
        )
    pp, num_microbatches = config.pipeline_model_parallel_size, data.global_batch_size // per_step
    if pp > 1 and config.virtual_pipeline_model_parallel_size and num_microbatches < pp:
        raise ConfigError(
            f"the interleaved pipeline schedule needs at least pipeline_model_parallel_size={pp} "
            f"micro-batches per step, the layout gives {num_microbatches}: raise "
            "data.global_batch_size or lower data.micro_batch_size"
        )


def check_estimable(config: EmoConfig) -> None:
    """Raise ConfigError for a setting the memory estimator's formulas (megatron_emo/memory.py)
    do not cover."""
    if config.recompute_granularity == "selective" and set(config.recompute_modules) != {"core_attn"}:
        raise ConfigError(
            f"recompute_modules={config.recompute_modules}: megatron_emo's layers recompute only "
            "core_attn selectively; use recompute_modules=['core_attn'] or recompute_granularity=full"
        )
    if config.pipeline_model_parallel_layout is not None:
        raise ConfigError(
            "pipeline_model_parallel_layout is not supported: split layers with "
            "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage"
        )
