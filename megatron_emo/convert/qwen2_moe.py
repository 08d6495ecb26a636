"""megatron_emo ↔ stock transformers ``Qwen2MoeForCausalLM`` (``model_type: qwen2_moe``).

Qwen2-MoE is the stock transformers class that expresses an EMO model exactly (no remote code):
pre-norm RMSNorm blocks, no QK-norm, no biases, RoPE ("rotate half"), softmax over the routed
experts then top-k without renormalisation (``norm_topk_prob: false``), plus one shared SwiGLU
expert. What is exact and what is not:

- **Routing.** HF routes every token over all routed experts (softmax, top-k). That is our
  model in eval mode with ``emo_eval_pool=None`` (and ``topk`` mode); EMO's document pools
  (random in training, ``emo_eval_pool`` in eval) have no HF equivalent, as in allenai's own HF
  release. The pool settings are recorded in ``config.json`` under ``emo_metadata``.
- **Attention.** Our attention is causal *within each document* (documents end at EOS); HF's is
  plain causal. Identical for text without EOS (a prompt, one document).
- **Shared experts.** Ours are one always-on SwiGLU MLP of width ``emo_num_shared_experts *
  moe_ffn_hidden_size`` (several always-on SwiGLU experts of weight 1 sum to one wider SwiGLU),
  so any number maps to Qwen2-MoE's single ``shared_expert`` of that width. Qwen2-MoE scales
  the shared expert by ``sigmoid(shared_expert_gate(x))``: we write the gate as zeros
  (sigmoid(0) = 0.5) and the shared ``down_proj`` times 2. Both factors are powers of two,
  so the reparametrisation is exact in any float format; importing halves ``down_proj`` and
  refuses a non-zero gate. With no shared expert (``emo_num_shared_experts=0``) the HF shared
  expert has width 0 (empty tensors), which contributes exactly nothing.
- **Vocabulary.** The export keeps the **padded** vocabulary (``vocab_size`` = the rows of our
  embedding, e.g. 2048 or EMO's 100,352): the tensors stay byte-identical so HF → megatron → HF
  round-trips exactly, the logits have the same shape as ours (parity is checked over every
  row), and it is the convention of Megatron and of EMO's released models. The padded rows are
  ids the tokenizer never produces; :func:`generation_config` suppresses them in generation.

Layouts undone (megatron-core's fused tensors against Hugging Face's separate ones):

- ``linear_qkv.weight`` ``[(nq + 2·ng)·d, h]`` is interleaved per query group:
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``; it is viewed as
  ``[ng, nq/ng + 2, d, h]`` and split into ``q_proj`` / ``k_proj`` / ``v_proj``. RoPE is the same
  rotate-half convention on both sides (``rotary_interleaved`` is refused), so no row permutation.
- SwiGLU ``fc1`` = ``[gate; up]``: megatron-core's ``MLP`` applies the activation to the first
  chunk (``x_glu, x_linear = torch.chunk(x, 2, dim=-1)``), so shared ``linear_fc1.weight``
  ``[2F, h]`` rows ``[:F]`` are ``gate_proj`` and ``[F:]`` ``up_proj``. Our routed experts store
  ``fc1`` ``[E, h, 2F]`` (gate columns, then up columns) and ``fc2`` ``[E, F, h]``: expert ``e``'s
  ``gate_proj`` = ``fc1[e, :, :F].T``, ``up_proj`` = ``fc1[e, :, F:].T``, ``down_proj`` = ``fc2[e].T``.
- Router ``mlp.router.weight`` ``[E_routed, h]`` (fp32) = ``mlp.gate.weight``; the shared experts
  have no router row.

HF tensors use the per-expert on-disk layout (``mlp.experts.{e}.gate_proj.weight`` ...), which
transformers 4.x and 5.x both load (5.x fuses them in memory); :func:`from_hf_state_dict` also
accepts 5.x's fused in-memory keys. The mapping is the table :data:`RULES`.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F

from megatron_emo.config import MODEL_DEFAULTS, EmoConfig, build_emo_config
from megatron_emo.recipes import DataConfig, GPTConfig, ModelSettings
from megatron_emo.validate import check_gpt

FORMAT_VERSION = 1
SHARED_DOWN_SCALE = 2.0
"""The shared expert's ``down_proj`` is multiplied by this: HF multiplies it by sigmoid(0) = 0.5."""


class ConversionError(ValueError):
    """A model or a file the conversion cannot express exactly; the message says what and why."""


@dataclass(frozen=True)
class GPTSettings:
    """The GPTModel arguments that are not in EmoConfig: a run's ``gpt`` section and
    ``data.seq_length``, with their defaults."""

    rotary_base: int = GPTConfig.rotary_base
    share_embeddings: bool = GPTConfig.share_embeddings
    max_position_embeddings: int = DataConfig.seq_length


@dataclass(frozen=True)
class Dims:
    """Every size the tensor layouts depend on."""

    num_layers: int
    hidden: int
    num_heads: int
    num_groups: int
    head_dim: int
    num_experts: int
    """Routed experts (HF ``num_experts``)."""
    ffn: int
    """Width of one routed expert."""
    shared_ffn: int
    """Width of the (merged) shared expert; 0 without shared experts."""
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: EmoConfig, gpt: GPTSettings) -> "Dims":
        return cls(
            num_layers=config.num_layers,
            hidden=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_groups=config.num_query_groups,
            head_dim=config.kv_channels,
            num_experts=config.num_routed_experts,
            ffn=config.moe_ffn_hidden_size,
            shared_ffn=config.emo_num_shared_experts * config.moe_ffn_hidden_size,
            vocab=config.emo_vocab_size,
            tied=gpt.share_embeddings,
        )


# --------------------------------------------------------------------------------------------
# Codecs: how one megatron tensor becomes one or more HF tensors and back. Tensors of per-expert
# HF names travel stacked on a leading expert axis; the rule expands/stacks them.


@dataclass(frozen=True)
class Codec:
    name: str
    to_hf: Callable[[torch.Tensor, Dims], tuple]
    from_hf: Callable[[tuple, Dims], torch.Tensor]


def _qkv_split(t, d):
    per_group = d.num_heads // d.num_groups
    grouped = t.view(d.num_groups, per_group + 2, d.head_dim, d.hidden)
    q = grouped[:, :per_group].reshape(d.num_heads * d.head_dim, d.hidden)
    k = grouped[:, per_group].reshape(d.num_groups * d.head_dim, d.hidden)
    v = grouped[:, per_group + 1].reshape(d.num_groups * d.head_dim, d.hidden)
    return q, k, v


def _qkv_merge(parts, d):
    q, k, v = parts
    per_group = d.num_heads // d.num_groups
    q = q.view(d.num_groups, per_group, d.head_dim, d.hidden)
    k = k.view(d.num_groups, 1, d.head_dim, d.hidden)
    v = v.view(d.num_groups, 1, d.head_dim, d.hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, d.hidden)


IDENTITY = Codec("identity", lambda t, d: (t,), lambda p, d: p[0])
QKV = Codec("qkv per query group", _qkv_split, _qkv_merge)
GATE_UP = Codec("[gate; up] rows", lambda t, d: tuple(t.chunk(2, dim=0)), lambda p, d: torch.cat(p, dim=0))
SHARED_DOWN = Codec(
    "x2 (sigmoid(0) = 0.5)", lambda t, d: (t * SHARED_DOWN_SCALE,), lambda p, d: p[0] / SHARED_DOWN_SCALE
)
EXPERT_GATE_UP = Codec(
    "[E, h, 2F] -> E x ([F, h], [F, h])",
    lambda t, d: (t[:, :, : d.ffn].transpose(1, 2), t[:, :, d.ffn :].transpose(1, 2)),
    lambda p, d: torch.cat([p[0].transpose(1, 2), p[1].transpose(1, 2)], dim=2),
)
EXPERT_DOWN = Codec("[E, F, h] -> E x [h, F]", lambda t, d: (t.transpose(1, 2),), lambda p, d: p[0].transpose(1, 2))


@dataclass(frozen=True)
class Rule:
    """One megatron tensor ↔ HF tensors. ``{L}``: layer; ``{E}`` in an HF name: one per expert."""

    megatron: str
    hf: tuple[str, ...]
    codec: Codec = IDENTITY
    applies: Callable[[Dims], bool] = lambda d: True

    @property
    def per_layer(self) -> bool:
        return "{L}" in self.megatron


_LAYER = "decoder.layers.{L}."
_HF = "model.layers.{L}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(_LAYER + "input_layernorm.weight", (_HF + "input_layernorm.weight",)),
    Rule(
        _LAYER + "self_attention.linear_qkv.weight",
        (_HF + "self_attn.q_proj.weight", _HF + "self_attn.k_proj.weight", _HF + "self_attn.v_proj.weight"),
        QKV,
    ),
    Rule(_LAYER + "self_attention.linear_proj.weight", (_HF + "self_attn.o_proj.weight",)),
    Rule(_LAYER + "pre_mlp_layernorm.weight", (_HF + "post_attention_layernorm.weight",)),
    Rule(_LAYER + "mlp.router.weight", (_HF + "mlp.gate.weight",)),
    Rule(
        _LAYER + "mlp.experts.fc1",
        (_HF + "mlp.experts.{E}.gate_proj.weight", _HF + "mlp.experts.{E}.up_proj.weight"),
        EXPERT_GATE_UP,
    ),
    Rule(_LAYER + "mlp.experts.fc2", (_HF + "mlp.experts.{E}.down_proj.weight",), EXPERT_DOWN),
    Rule(
        _LAYER + "mlp.shared_experts.linear_fc1.weight",
        (_HF + "mlp.shared_expert.gate_proj.weight", _HF + "mlp.shared_expert.up_proj.weight"),
        GATE_UP,
        applies=lambda d: d.shared_ffn > 0,
    ),
    Rule(
        _LAYER + "mlp.shared_experts.linear_fc2.weight",
        (_HF + "mlp.shared_expert.down_proj.weight",),
        SHARED_DOWN,
        applies=lambda d: d.shared_ffn > 0,
    ),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), applies=lambda d: not d.tied),
)
"""The whole mapping, in HF checkpoint order. HF tensors no rule produces are :data:`HF_ONLY`."""

HF_ONLY: tuple[str, ...] = (_HF + "mlp.shared_expert_gate.weight",)
"""Written as zeros (the gate); on import they must be zero."""

HF_EMPTY_SHARED: tuple[str, ...] = (
    _HF + "mlp.shared_expert.gate_proj.weight",
    _HF + "mlp.shared_expert.up_proj.weight",
    _HF + "mlp.shared_expert.down_proj.weight",
)
"""Without shared experts: Qwen2-MoE's shared expert, written with width 0."""


def megatron_shapes(d: Dims) -> dict[str, tuple]:
    """Every tensor of a megatron_emo GPTModel state dict (no ``_extra_state``), with its shape."""
    h, qkv = d.hidden, (d.num_heads + 2 * d.num_groups) * d.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv, h),
        "self_attention.linear_proj.weight": (h, d.num_heads * d.head_dim),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.router.weight": (d.num_experts, h),
        "mlp.experts.fc1": (d.num_experts, h, 2 * d.ffn),
        "mlp.experts.fc2": (d.num_experts, d.ffn, h),
    }
    if d.shared_ffn:
        per_layer["mlp.shared_experts.linear_fc1.weight"] = (2 * d.shared_ffn, h)
        per_layer["mlp.shared_experts.linear_fc2.weight"] = (h, d.shared_ffn)
    return _model_shapes(d, per_layer, "embedding.word_embeddings.weight", "decoder.layers.",
                         "decoder.final_layernorm.weight", "output_layer.weight")


def hf_shapes(d: Dims) -> dict[str, tuple]:
    """Every tensor of the exported Qwen2-MoE checkpoint (per-expert layout), in file order."""
    h, qd, kd = d.hidden, d.num_heads * d.head_dim, d.num_groups * d.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (qd, h),
        "self_attn.k_proj.weight": (kd, h),
        "self_attn.v_proj.weight": (kd, h),
        "self_attn.o_proj.weight": (h, qd),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate.weight": (d.num_experts, h),
    }
    for e in range(d.num_experts):
        per_layer[f"mlp.experts.{e}.gate_proj.weight"] = (d.ffn, h)
        per_layer[f"mlp.experts.{e}.up_proj.weight"] = (d.ffn, h)
        per_layer[f"mlp.experts.{e}.down_proj.weight"] = (h, d.ffn)
    per_layer["mlp.shared_expert.gate_proj.weight"] = (d.shared_ffn, h)
    per_layer["mlp.shared_expert.up_proj.weight"] = (d.shared_ffn, h)
    per_layer["mlp.shared_expert.down_proj.weight"] = (h, d.shared_ffn)
    per_layer["mlp.shared_expert_gate.weight"] = (1, h)
    return _model_shapes(d, per_layer, "model.embed_tokens.weight", "model.layers.", "model.norm.weight",
                         "lm_head.weight")


def _model_shapes(d: Dims, per_layer: dict, embedding: str, layers: str, final_norm: str, output: str) -> dict:
    """Embedding, ``per_layer`` for every layer (``<layers><L>.<name>``), final norm, untied output."""
    shapes = {embedding: (d.vocab, d.hidden)}
    for layer in range(d.num_layers):
        shapes.update({f"{layers}{layer}.{name}": shape for name, shape in per_layer.items()})
    shapes[final_norm] = (d.hidden,)
    if not d.tied:
        shapes[output] = (d.vocab, d.hidden)
    return shapes


# --------------------------------------------------------------------------------------------
# Config


def check_exportable(config: EmoConfig, gpt: GPTSettings) -> None:
    """Raise ConversionError listing every setting Qwen2-MoE cannot express (ConfigError for
    settings no run may have)."""
    check_gpt(gpt)
    problems = []
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        problems.append(
            f"kv_channels={config.kv_channels} x num_attention_heads={config.num_attention_heads} != "
            f"hidden_size={config.hidden_size}: Qwen2-MoE derives head_dim = hidden_size / heads"
        )
    if config.softmax_scale is not None and not math.isclose(config.softmax_scale, config.kv_channels**-0.5):
        problems.append(f"softmax_scale={config.softmax_scale}: Qwen2-MoE scales attention by head_dim ** -0.5")
    for name, why in (
        ("qk_layernorm", "Qwen2-MoE has no QK-norm"),
        ("add_qkv_bias", "megatron_emo exports bias-free attention only"),
        ("rotary_interleaved", "Qwen2-MoE's RoPE rotates halves, not interleaved pairs"),
        ("apply_residual_connection_post_layernorm", "Qwen2-MoE adds the residual before the norm"),
    ):
        if getattr(config, name, False):
            problems.append(f"{name}=True: {why}")
    # (Every EmoConfig is gated and bias-free: megatron_emo.validate.check_model.)
    if config.activation_func is not F.silu:
        problems.append("activation_func: the experts must be SwiGLU (activation_func=silu)")
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r}: Qwen2-MoE uses RMSNorm")
    if getattr(config, "moe_router_topk_scaling_factor", None) not in (None, 1.0):
        problems.append("moe_router_topk_scaling_factor: Qwen2-MoE does not scale the routing weights")
    if problems:
        raise ConversionError(
            "this megatron_emo model cannot be written as a stock Qwen2MoeForCausalLM:\n  - "
            + "\n  - ".join(problems)
        )


def emo_metadata(config: EmoConfig) -> dict:
    """What the HF config cannot say, kept in ``config.json`` (transformers keeps unknown keys)."""
    return {
        "format_version": FORMAT_VERSION,
        "source": "megatron_emo",
        "num_shared_experts": config.emo_num_shared_experts,
        "shared_expert_down_proj_scale": SHARED_DOWN_SCALE,
        "shared_expert_gate": "zero (sigmoid = 0.5, compensated by the down_proj scale)",
        "router_mode": config.emo_router_mode,
        "pool_min": config.emo_pool_min,
        "pool_max": config.emo_pool_max,
        "eval_pool": config.emo_eval_pool,
        "routing_in_this_format": "per token over all routed experts (no document pool)",
        "attention_in_this_format": "plain causal (megatron_emo masks across EOS document boundaries)",
    }


def to_hf_config(
    config: EmoConfig,
    gpt: GPTSettings,
    *,
    bos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
):
    """The ``Qwen2MoeConfig`` of a megatron_emo model."""
    from transformers import Qwen2MoeConfig

    check_exportable(config, gpt)
    d = Dims.of(config, gpt)
    hf_config = Qwen2MoeConfig(
        vocab_size=d.vocab,
        hidden_size=d.hidden,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_heads,
        num_key_value_heads=d.num_groups,
        hidden_act="silu",
        max_position_embeddings=gpt.max_position_embeddings,
        initializer_range=config.init_method_std,
        rms_norm_eps=config.layernorm_epsilon,
        tie_word_embeddings=gpt.share_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(gpt.rotary_base)},
        use_sliding_window=False,
        attention_dropout=0.0,
        decoder_sparse_step=1,
        moe_intermediate_size=d.ffn,
        shared_expert_intermediate_size=d.shared_ffn,
        num_experts_per_tok=config.routed_topk,
        num_experts=d.num_experts,
        norm_topk_prob=False,
        mlp_only_layers=[],
        qkv_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=config.emo_eos_token_id,
        pad_token_id=pad_token_id,
    )
    hf_config.architectures = ["Qwen2MoeForCausalLM"]
    hf_config.rope_theta = float(gpt.rotary_base)  # the key transformers 4.x reads (5.x: rope_parameters)
    hf_config.dtype = dtype
    hf_config.emo_metadata = emo_metadata(config)
    return hf_config


@dataclass
class ImportedConfig:
    """A Qwen2-MoE config read back: a run's model section and the GPT settings."""

    model: ModelSettings
    gpt: GPTSettings
    vocab_size: int
    eos_token_id: int
    dtype: torch.dtype = torch.float32

    def emo_config(self, **overrides) -> EmoConfig:
        """The model config, one CPU process: bf16 weights for a bf16 model, fp32 otherwise;
        ``overrides`` are EmoConfig fields (e.g. emo_eval_pool=None)."""
        model = {**self.model, "bf16": self.dtype == torch.bfloat16, **overrides}
        return build_emo_config(model, vocab_size=self.vocab_size, eos_token_id=self.eos_token_id, on_gpu=False)


def _get(hf_config, name, default=None):
    return getattr(hf_config, name, default)


def from_hf_config(hf_config) -> ImportedConfig:
    """Read a Qwen2-MoE config (ours or any stock one the model can express) back."""
    problems = []
    if _get(hf_config, "model_type") != "qwen2_moe":
        problems.append(f"model_type={_get(hf_config, 'model_type')!r}: expected 'qwen2_moe'")
    if _get(hf_config, "norm_topk_prob"):
        problems.append("norm_topk_prob=True: megatron_emo does not renormalise the top-k weights")
    if _get(hf_config, "qkv_bias"):
        problems.append("qkv_bias=True: megatron_emo's attention has no biases")
    if _get(hf_config, "use_sliding_window"):
        problems.append("use_sliding_window=True: megatron_emo has full attention only")
    if _get(hf_config, "mlp_only_layers") or _get(hf_config, "decoder_sparse_step", 1) != 1:
        problems.append("dense layers (mlp_only_layers / decoder_sparse_step != 1): every megatron_emo layer is MoE")
    if _get(hf_config, "hidden_act") != "silu":
        problems.append(f"hidden_act={_get(hf_config, 'hidden_act')!r}: megatron_emo's experts are SwiGLU")
    rope = _get(hf_config, "rope_parameters") or {}
    theta = rope.get("rope_theta", _get(hf_config, "rope_theta"))
    if rope.get("rope_type", "default") != "default" or theta is None:
        problems.append(f"rope_parameters={rope}: only default RoPE with a rope_theta maps")
    elif not float(theta).is_integer():
        problems.append(f"rope_theta={theta}: megatron_emo's RoPE base (gpt.rotary_base) is a whole number")
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = _get(hf_config, "head_dim") or hidden // heads
    if head_dim * heads != hidden:
        problems.append(f"head_dim={head_dim} x heads={heads} != hidden_size={hidden}")
    ffn, shared = hf_config.moe_intermediate_size, hf_config.shared_expert_intermediate_size
    if shared % ffn:
        problems.append(
            f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size={ffn}: "
            "megatron_emo's shared experts are whole experts"
        )
    eos = _get(hf_config, "eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        problems.append("eos_token_id is not set: EMO's router needs the document separator")
    if problems:
        raise ConversionError(
            "this Qwen2-MoE config cannot be read as a megatron_emo model:\n  - " + "\n  - ".join(problems)
        )
    n_shared = shared // ffn
    n_routed, topk = hf_config.num_experts, hf_config.num_experts_per_tok
    meta = _get(hf_config, "emo_metadata") or {}
    model = ModelSettings(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=hf_config.intermediate_size,
        num_moe_experts=n_routed + n_shared,
        moe_router_topk=topk + n_shared,
        moe_ffn_hidden_size=ffn,
        emo_num_shared_experts=n_shared,
        layernorm_epsilon=hf_config.rms_norm_eps,
        init_method_std=hf_config.initializer_range,
        emo_router_mode=meta.get("router_mode", MODEL_DEFAULTS["emo_router_mode"]),
        emo_pool_min=meta.get("pool_min", max(topk, min(MODEL_DEFAULTS["emo_pool_min"], n_routed))),
        emo_pool_max=meta.get("pool_max", n_routed + n_shared),
        emo_eval_pool=meta.get("eval_pool"),
    )
    groups = hf_config.num_key_value_heads or heads
    if groups != heads:
        model["num_query_groups"] = groups
    dtype = _get(hf_config, "dtype") or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    gpt = GPTSettings(
        rotary_base=int(theta),
        share_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=hf_config.max_position_embeddings,
    )
    return ImportedConfig(model=model, gpt=gpt, vocab_size=hf_config.vocab_size, eos_token_id=int(eos), dtype=dtype)


# --------------------------------------------------------------------------------------------
# State dicts


def tensors_of(state_dict: dict) -> dict:
    """Drop megatron-core's ``_extra_state`` entries (None or bytes, never weights)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("._extra_state")}


def _check_shapes(found: dict, expected: dict, what: str, hint: str) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k}: {tuple(found[k].shape)}, expected {expected[k]}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {wrong[:3]})")
        raise ConversionError(f"{what} does not match its config: " + "; ".join(parts) + f". {hint}")


def _expand(rule: Rule, layers: Iterable[int]) -> Iterator[tuple[Optional[int], str]]:
    for layer in layers if rule.per_layer else [None]:
        yield layer, rule.megatron.format(L=layer)


def iter_hf_tensors(
    state_dict: dict, config: EmoConfig, gpt: GPTSettings, *, dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` in :func:`hf_shapes` order, one megatron tensor at a time.

    Args:
        state_dict: the bare GPTModel's ``state_dict()`` (a checkpoint's ``"model"``), full
            (unsharded) tensors; ``_extra_state`` entries are ignored.
        dtype: of every output tensor; None: the embedding's dtype (the router, kept in fp32 by
            megatron_emo, is cast to it too, as the HF model has one dtype).
    """
    check_exportable(config, gpt)
    d = Dims.of(config, gpt)
    tensors = tensors_of(state_dict)
    _check_shapes(
        tensors,
        megatron_shapes(d),
        "the megatron_emo state dict",
        "Export needs a full (not tensor/expert/pipeline-sharded) state dict of the model the "
        "config describes.",
    )
    dtype = dtype or tensors["embedding.word_embeddings.weight"].dtype
    global_rules = {r.hf[0]: r for r in RULES if not r.per_layer and r.applies(d)}
    layer_rules = [r for r in RULES if r.per_layer and r.applies(d)]
    layer_names = [k[len("model.layers.0."):] for k in hf_shapes(_one_layer(d)) if k.startswith("model.layers.0.")]
    done = set()
    for name in hf_shapes(d):
        if name in global_rules:
            yield name, _own(tensors[global_rules[name].megatron], dtype)
            continue
        layer = int(name.split(".")[2])
        if layer not in done:
            done.add(layer)
            yield from _layer_to_hf(tensors, layer, layer_rules, layer_names, d, dtype)


def _own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy with its own storage (safetensors refuses tensors sharing memory)."""
    return t.to(dtype).contiguous().clone()


def _layer_to_hf(tensors, layer, rules, layer_names, d, dtype):
    prefix = f"model.layers.{layer}."
    produced = {}
    for rule in rules:
        parts = rule.codec.to_hf(tensors[rule.megatron.format(L=layer)], d)
        for template, part in zip(rule.hf, parts):
            if "{E}" in template:
                for e in range(d.num_experts):
                    produced[template.format(L=layer, E=e)] = part[e]
            else:
                produced[template.format(L=layer)] = part
    for template in HF_ONLY:
        produced[template.format(L=layer)] = torch.zeros(1, d.hidden, dtype=dtype)
    if not d.shared_ffn:
        for template in HF_EMPTY_SHARED:
            shape = (d.hidden, 0) if "down_proj" in template else (0, d.hidden)
            produced[template.format(L=layer)] = torch.zeros(shape, dtype=dtype)
    for name in layer_names:
        yield prefix + name, _own(produced[prefix + name], dtype)


def _one_layer(d: Dims) -> Dims:
    return dataclasses.replace(d, num_layers=1)


def to_hf_state_dict(
    state_dict: dict, config: EmoConfig, gpt: GPTSettings, *, dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """The Qwen2-MoE state dict (per-expert on-disk keys) of a megatron_emo state dict."""
    return dict(iter_hf_tensors(state_dict, config, gpt, dtype=dtype))


def _unfuse_experts(hf: dict, d: Dims) -> dict:
    """transformers 5.x in-memory keys (``mlp.experts.gate_up_proj`` [E, 2F, h],
    ``mlp.experts.down_proj`` [E, h, F]) → per-expert keys."""
    hf = dict(hf)
    for layer in range(d.num_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = hf.pop(prefix + "gate_up_proj", None), hf.pop(prefix + "down_proj", None)
        if gate_up is None and down is None:
            continue
        if gate_up is None or down is None or gate_up.shape != (d.num_experts, 2 * d.ffn, d.hidden):
            raise ConversionError(f"{prefix}gate_up_proj/down_proj: incomplete or misshaped fused experts")
        for e in range(d.num_experts):
            hf[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, : d.ffn]
            hf[f"{prefix}{e}.up_proj.weight"] = gate_up[e, d.ffn :]
            hf[f"{prefix}{e}.down_proj.weight"] = down[e]
    return hf


def from_hf_state_dict(hf_state_dict: dict, config: EmoConfig, gpt: GPTSettings) -> dict[str, torch.Tensor]:
    """The megatron_emo GPTModel tensors (no ``_extra_state``) of a Qwen2-MoE state dict.

    Tensors get ``config.params_dtype``, the router fp32 (as megatron_emo keeps it). Refuses a
    non-zero shared-expert gate (a per-token sigmoid gate is not an always-on expert).
    """
    check_exportable(config, gpt)
    d = Dims.of(config, gpt)
    hf = _unfuse_experts(hf_state_dict, d)
    if d.tied and "lm_head.weight" in hf:
        if not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
            raise ConversionError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    _check_shapes(hf, hf_shapes(d), "the Qwen2-MoE state dict", "Check that config.json belongs to these weights.")
    for layer in range(d.num_layers):
        gate = hf[f"model.layers.{layer}.mlp.shared_expert_gate.weight"]
        if torch.count_nonzero(gate):
            raise ConversionError(
                f"model.layers.{layer}.mlp.shared_expert_gate.weight is not zero (max |w| = "
                f"{gate.abs().max().item():.3g}): Qwen2-MoE's sigmoid gate then varies per token, "
                "which megatron_emo's always-on shared expert (weight 1) cannot express"
            )
    out = {}
    for rule in RULES:
        if not rule.applies(d):
            continue
        for layer, name in _expand(rule, range(d.num_layers)):
            parts = []
            for template in rule.hf:
                if "{E}" in template:
                    parts.append(torch.stack([hf[template.format(L=layer, E=e)] for e in range(d.num_experts)]))
                else:
                    parts.append(hf[template.format(L=layer)])
            dtype = torch.float32 if name.endswith("mlp.router.weight") else config.params_dtype
            out[name] = rule.codec.from_hf(tuple(parts), d).to(dtype).contiguous()
    return out
