"""Run configurations: named recipes plus dotted command-line overrides.

A run is a :class:`RunConfig`: ``model`` is a :class:`ModelSettings`, the
:class:`~megatron_emo.config.EmoConfig` fields the run sets (megatron-core's and EMO's); the
other sections are small dataclasses. Recipes are functions returning a RunConfig;
``--set section.field=value`` overrides any field, checked against its type, and unknown names
fail with the list of valid ones. The rules a run is checked against: megatron_emo/validate.py.
"""

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from megatron_emo.config import MODEL_DEFAULTS, ConfigError, EmoConfig, build_emo_config
from megatron_emo.data.tokenizer import padded_vocab_size
from megatron_emo.validate import checked_value, did_you_mean, model_value


class ModelSettings(dict):
    """The model section: the EmoConfig fields a run sets, by name; the others keep EmoConfig's
    defaults. Each name must be an EmoConfig field and each value of its field's type, checked
    as it is set (:func:`megatron_emo.validate.model_value`), whether by a recipe, by
    ``--set model.X=...`` or by a run_config.json read back. A dict rather than a dataclass of
    EmoConfig's 250 fields, so that run_config.json holds what the run set and nothing else."""

    def __init__(self, fields: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **more: Any):
        super().__init__()
        self.update(fields, **more)

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, model_value(self, name, value))

    def update(self, fields: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **more: Any) -> None:
        for name, value in dict(fields, **more).items():
            self[name] = value

    def setdefault(self, name: str, value: Any = None) -> Any:
        if name not in self:
            self[name] = value
        return self[name]

    def __ior__(self, fields):
        self.update(fields)
        return self


@dataclass(kw_only=True)
class DataConfig:
    blend: list = field(default_factory=list)
    """Weighted indexed datasets, ``[[weight, prefix], ...]`` (prefixes from
    tools/preprocess_data.py); empty: the demo corpus (code, docs, prose, equal weights), built
    into ``cache_dir/demo`` on first use."""
    tokenizer_model: Optional[str] = None
    """The SentencePiece ``.model`` the datasets were made with (required with ``blend``)."""
    demo_vocab_size: int = 2048
    """Vocabulary of the tokenizer trained for the demo corpus."""
    cache_dir: str = "runs/cache"
    """Demo data and megatron-core's sample-index cache."""
    split: str = "98,2,0"
    """Train/validation/test shares of every dataset's documents."""
    seq_length: int = 4096
    micro_batch_size: int = 4
    """Sequences per micro-batch on one data-parallel rank."""
    global_batch_size: int = 1024
    """Sequences per optimizer step over all data-parallel ranks and micro-batches."""
    seed: int = 0
    """Shuffles the samples."""


@dataclass(kw_only=True)
class GPTConfig:
    rotary_base: int = 500_000
    """RoPE's base (EMO's)."""
    share_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size."""
    min_vocab_size: int = 0
    """Pad the vocabulary to at least this many rows (to match a released model's shape)."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 4e-3
    min_lr: float = 4e-4
    """The decay ends here at the last step."""
    warmup_steps: int = 2000
    schedule: str = "cosine"
    """After the warm-up: ``cosine`` to min_lr over the run, or ``wsd`` (warmup-stable-decay:
    constant, then a linear anneal to min_lr over the last ``anneal_steps``)."""
    anneal_steps: int = 0
    """Length of the final linear anneal of the ``wsd`` schedule."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Applied to every parameter except the input embeddings (as EMO)."""
    clip_grad: float = 1.0


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 238_419
    seed: int = 0
    """Seeds weight initialisation."""
    log_interval: int = 1
    output_dir: str = "runs/default"
    """Tokenizer, metrics (metrics.jsonl) and TensorBoard logs go here."""
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    """Also log the TensorBoard scalars and the run config to this Weights & Biases project
    (None: off; needs ``pip install wandb``)."""
    save: bool = True
    """Write checkpoints to ``output_dir/checkpoints`` (every ``save_interval`` steps, at the end,
    and on SIGTERM/SIGUSR1)."""
    save_interval: int = 1000
    async_save: bool = False
    """GPU: write checkpoints in background processes while training goes on (the state is
    copied to host memory first); each is published once every rank has written it."""
    keep_last: int = 2
    """Checkpoints kept besides the every-``keep_every`` ones."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in ``output_dir`` if there is one."""
    init_from: Optional[str] = None
    """A checkpoint folder whose model weights start the run (not its optimizer or step), e.g.
    one written by tools/convert_from_hf.py; ignored when the run resumes."""
    nan_policy: str = "skip"
    """A step with a non-finite loss or gradient norm: ``skip`` it (no update) or ``stop``."""
    max_nan_skips: int = 3
    """More non-finite steps in a row than this stop the run (with a checkpoint)."""
    spike_factor: float = 3.0
    """Log a warning when the loss exceeds this multiple of its running mean."""
    eval_interval: int = 0
    """Validation loss per domain every this many steps and at the end (0: never)."""
    eval_samples: int = 64
    """Validation samples per domain."""


@dataclass(kw_only=True)
class RunConfig:
    name: str
    model: ModelSettings
    data: DataConfig = field(default_factory=DataConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        # A plain dict (a recipe's, a run_config.json's) passes the model section's checks here.
        self.model = ModelSettings(self.model)

    def model_vocab_size(self, tokenizer_vocab_size: int) -> int:
        """The model's vocabulary for a tokenizer's: padded to a multiple of
        ``gpt.make_vocab_size_divisible_by`` x TP (Megatron's convention), at least
        ``gpt.min_vocab_size``."""
        tp = self.model.get("tensor_model_parallel_size", MODEL_DEFAULTS["tensor_model_parallel_size"])
        return max(padded_vocab_size(tokenizer_vocab_size, self.gpt.make_vocab_size_divisible_by, tp),
                   self.gpt.min_vocab_size)

    def emo_config(self, *, vocab_size: int, eos_token_id: int, on_gpu: bool) -> EmoConfig:
        """The model config for the tokenizer's vocabulary and EOS id and the device
        (:func:`~megatron_emo.config.build_emo_config`)."""
        return build_emo_config(self.model, vocab_size=vocab_size, eos_token_id=eos_token_id, on_gpu=on_gpu)


_EMO_1B14B_MODEL = dict(
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=16,
    ffn_hidden_size=1024,
    num_moe_experts=128,
    moe_router_topk=8,
    moe_ffn_hidden_size=1024,
    # EMO's router settings are EmoConfig's defaults, written out so the recipe shows them.
    **{name: MODEL_DEFAULTS[name] for name in ("emo_num_shared_experts", "emo_pool_min", "emo_pool_max",
                                               "emo_eval_pool")},
)


def tiny() -> RunConfig:
    """A 4-layer, 16+1-expert EMO model that trains on 2 CPU cores in minutes."""
    return RunConfig(
        name="tiny",
        model=dict(
            num_layers=4,
            hidden_size=128,
            num_attention_heads=4,
            ffn_hidden_size=64,
            num_moe_experts=17,
            moe_router_topk=3,
            moe_ffn_hidden_size=64,
            emo_num_shared_experts=1,
            emo_pool_min=4,
            emo_pool_max=16,
            emo_eval_pool=8,
        ),
        data=DataConfig(seq_length=256, micro_batch_size=8, global_batch_size=16),
        gpt=GPTConfig(rotary_base=10_000, make_vocab_size_divisible_by=64),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=20),
        train=TrainConfig(steps=200, log_interval=10, eval_interval=100, eval_samples=32, save_interval=50,
                          output_dir="runs/tiny"),
    )


def emo_1b14b() -> RunConfig:
    """EMO's flagship: 16 layers, d 2048, 127 routed + 1 shared experts of 1024, top-8.

    AdamW 4e-3, betas .9/.95, wd 0.1, 2000 warm-up steps, cosine to 4e-4, seq 4096, 1024
    sequences per step, 1T tokens. The vocabulary is padded to dolma2's 100,352 rows.
    """
    return RunConfig(
        name="emo_1b14b",
        model=dict(_EMO_1B14B_MODEL),
        gpt=GPTConfig(min_vocab_size=100_352),
        train=TrainConfig(output_dir="runs/emo_1b14b"),
    )


def stdmoe_1b14b() -> RunConfig:
    """The standard-MoE twin of emo_1b14b: same model and recipe, plain top-k routing."""
    run = emo_1b14b()
    run.name = "stdmoe_1b14b"
    run.model["emo_router_mode"] = "topk"
    run.train.output_dir = "runs/stdmoe_1b14b"
    return run


def proxy_1gpu() -> RunConfig:
    """The flagship at full width with as many layers as train on one 80 GB H100: the
    single-GPU throughput proxy (tools/benchmark_throughput.py).

    Parameters: a layer holds 822M (attention 4·2048² = 16.8M, 128 experts × 3·2048·1024 =
    805M, router 0.26M), embeddings and the untied LM head 2 × 100,352·2048 = 411M. On one GPU
    (data-parallel size 1, so a distributed optimizer shards nothing) training keeps 18 bytes
    per parameter: bf16 weights 2, fp32 gradients 4, fp32 main weights 4, Adam moments 8.
    3 layers: 2.88B params, 48.2 GiB; 4 layers: 3.70B, 62.0 GiB (the proxy stays at 3 layers so
    that its results compare across dates). 16 sequences per step, the per-GPU share of EMO's
    1024 sequences on 64 GPUs, in micro-batches of 8 (32,768 tokens, ~1800 rows per expert).
    The micro-batch is the largest that fits the 80 GB H100: activations add 6.0 GiB at 2
    sequences and 21.8 GiB at 8 (``tools/estimate_memory.py --recipe proxy_1gpu --world-size 1``:
    54.3 and 70.1 GiB in all; measured on an H200 on 2026-12-06: 53.9 and 69.5 GiB at most).
    It pays: each micro-batch adds every expert weight's gradient into its fp32 ``main_grad``
    (805M parameters a layer), and an expert's GEMMs run faster on more rows. On that H200, 8
    gave 164,042 tokens/s against 143,504 at 2 (benchmarks/results/2026-12-06_h200_proxy_1gpu_throughput.json).
    """
    run = emo_1b14b()
    run.name = "proxy_1gpu"
    run.model["num_layers"] = 3
    run.data.micro_batch_size = 8
    run.data.global_batch_size = 16
    run.train.output_dir = "runs/proxy_1gpu"
    return run


RECIPES: dict[str, Callable[[], RunConfig]] = {
    "tiny": tiny,
    "emo_1b14b": emo_1b14b,
    "stdmoe_1b14b": stdmoe_1b14b,
    "proxy_1gpu": proxy_1gpu,
}


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {sorted(RECIPES)}")
    return RECIPES[name]()


def resolve_run(recipe: str, overrides: Iterable[str] = ()) -> RunConfig:
    """Recipe ``recipe`` with the ``--set`` assignments ``overrides`` applied in order."""
    run = get_recipe(recipe)
    for assignment in overrides:
        apply_override(run, assignment)
    return run


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as emo_router_mode=topk


def apply_override(run: RunConfig, assignment: str) -> None:
    """Apply one ``section.field=value`` override in place."""
    dotted, sep, text = assignment.partition("=")
    section, dot, name = dotted.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {assignment!r} is not of the form section.field=value")
    value = _parse_value(text.strip())
    if section == "model":
        run.model[name] = value  # checked by ModelSettings
        return
    sections = {f.name for f in dataclasses.fields(RunConfig) if f.name not in ("name", "model")}
    if section not in sections:
        raise ConfigError(f"unknown section {section!r} in {assignment!r}: use one of {sorted(sections | {'model'})}")
    target = getattr(run, section)
    names = [f.name for f in dataclasses.fields(target)]
    if name not in names:
        raise ConfigError(f"{section}.{name} does not exist{did_you_mean(name, names)}: {section} has {names}")
    setattr(target, name, checked_value(f"{section}.{name}", value, getattr(target, name)))
