import pytest

from megatron_emo.config import ConfigError
from megatron_emo.memory import estimate_memory
from megatron_emo.recipes import DataConfig, GPTConfig, RunConfig, resolve_run

HAND_MODEL = dict(
    num_layers=2,
    hidden_size=8,
    num_attention_heads=2,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=4,
    ffn_hidden_size=4,
    emo_pool_min=1,
    emo_pool_max=3,
    emo_eval_pool=2,
)
"""h 8, 2 heads of 4, 3 routed experts + 1 shared of width 4, 1 routed choice per token."""


def _hand_run(**model) -> RunConfig:
    return RunConfig(
        name="hand",
        model={**HAND_MODEL, **model},
        data=DataConfig(seq_length=8, micro_batch_size=1, global_batch_size=4),
        gpt=GPTConfig(make_vocab_size_divisible_by=8),
    )


def _flagship(world_size: int, *overrides: str, recompute: str = None):
    run = resolve_run("emo_1b14b", ("data.micro_batch_size=1",) + overrides)
    estimate = estimate_memory(run, world_size=world_size, vocab_size=100_278)
    return estimate.worst().total(recompute or estimate.recompute)


def test_hand_checked_tiny_model():
    estimate = estimate_memory(_hand_run(), world_size=1, vocab_size=16)
    # Per layer: norms 2h = 16, attention h(n+2g)d + ndh = 192 + 64, router E·h = 24, shared
    # 3·h·F_s = 96 (dense 392); routed experts 3·h·F·E = 288. Embedding and output layer V·h =
    # 128 each, final norm 8.
    (stage,) = estimate.stages
    assert stage.params == estimate.model_params == 2 * (392 + 288) + 128 + 128 + 8 == 1624
    assert (stage.weights, stage.grads, stage.optimizer) == (2 * 1624, 4 * 1624, 12 * 1624)
    # T = 8 tokens, N = 8 routed rows, bf16 activations (a = 2).
    assert estimate.layer_activations == {
        "norms": 2 * (2 * 8 + 4) * 8,                      # 2 · (a·h + 4)·T
        "attention": 2 * 8 * 8 + 2 * (6 + 4 + 2) * 4 * 8,  # a·h·T + a·((n+2g) + (n+g) + n)·d·T
        "core attention": (2 * 2 * 4 + 4 * 2) * 8,         # (a·n·d + 4n)·T
        "router": 4 * 8 * 8 + (4 * 3 + 12 * 1 + 4) * 8,    # 4h·T + (4E + 12K + 4)·T
        "routed experts": (2 * 8 + 3 * 2 * 4) * 8 + (2 * 8 + 8) * 8,
        "shared expert": 2 * 8 * 8 + 5 * 2 * 4 * 8,
    }
    layer = sum(estimate.layer_activations.values())
    assert layer == 2848
    # Two layers stored, then the larger backward phase. The output layer's: final norm and
    # output-layer input (2a·h + 4)·T, the loss a·T·V + 12·T, the weight's bf16 gradient a·V·h.
    # A layer's: its gradients (one layer) and the largest bf16 gradient (fc1 or QKV: 192).
    lm_head_backward = 36 * 8 + 2 * 8 * 16 + 12 * 8 + 2 * 128
    layer_backward = layer + 2 * 192
    assert layer_backward > lm_head_backward
    assert stage.activations["none"] == 2 * layer + layer_backward == 8928
    # Full recompute: each layer keeps its input a·h·T and one layer is rebuilt in backward.
    assert stage.activations["full"] == 2 * 128 + layer + layer_backward
    assert stage.total("none") == 18 * 1624 + 8928


def test_the_output_layer_backward_and_a_layer_backward_never_overlap():
    """The peak adds the larger of the two backward phases to what is stored, not both: at
    micro-batch 8 the proxy's logits (6.1 GiB) outweigh a layer's backward."""
    run = resolve_run("proxy_1gpu", ("data.micro_batch_size=8",))
    estimate = estimate_memory(run, world_size=1, vocab_size=100_278)
    (stage,) = estimate.stages
    layer = sum(estimate.layer_activations.values())
    logits = 2 * 8 * 4096 * 100_352
    stored = 3 * layer
    assert stored + logits < stage.activations["none"] < stored + logits + layer


def test_parameter_count_matches_the_built_model(megatron_cpu):
    from megatron_emo.model.gpt import build_gpt_model

    run = _hand_run()
    estimate = estimate_memory(run, world_size=1, vocab_size=16)
    config = run.emo_config(vocab_size=16, eos_token_id=0, on_gpu=False)
    model = build_gpt_model(config, max_sequence_length=8, rotary_base=10_000)
    assert estimate.stages[0].params == sum(p.numel() for p in model.parameters())


def test_padding_experts_are_allocated():
    # 3 routed experts over EP 2: padded to 4, two per rank.
    estimate = estimate_memory(_hand_run(expert_model_parallel_size=2), world_size=2, vocab_size=16)
    assert estimate.padding_params == 2 * 3 * 8 * 4
    assert estimate.stages[0].params == 2 * (392 + 3 * 8 * 4 * 2) + 264


def test_uneven_pipeline_split():
    run = _hand_run(num_layers=4, pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1)
    assert [stage.layers for stage in estimate_memory(run, world_size=2, vocab_size=16).stages] == [1, 3]


@pytest.mark.parametrize(
    "model, world_size, message",
    [
        (dict(tensor_model_parallel_size=2), 3, "cannot hold tensor_model_parallel_size=2"),
        (dict(tensor_model_parallel_size=4), 4, "num_attention_heads"),
        (dict(expert_model_parallel_size=4), 2, "does not divide the 2 ranks of a pipeline stage"),
        (dict(pipeline_model_parallel_size=3), 3, "cannot be split evenly"),
        (dict(num_layers=4, pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=1), 3, "divisible"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, num_layers=4), 2,
         "at least pipeline_model_parallel_size=2 micro-batches"),
        (dict(recompute_granularity="selective", recompute_modules=["layernorm"]), 1, "core_attn"),
    ],
)
def test_impossible_layouts_are_refused(model, world_size, message):
    run = _hand_run(**model)
    run.data.global_batch_size = 1
    with pytest.raises(ConfigError, match=message):
        estimate_memory(run, world_size=world_size, vocab_size=16)


def test_batch_must_split_over_data_parallel_ranks():
    with pytest.raises(ConfigError, match="global_batch_size=4 is not a multiple"):
        estimate_memory(_hand_run(), world_size=8, vocab_size=16)


def test_refusal_names_the_cause_and_the_cli_exits_nonzero(capsys):
    from tools.estimate_memory import EXIT_DOES_NOT_FIT, main

    estimate = estimate_memory(_hand_run(), world_size=1, vocab_size=16)
    # 38,800 bytes at the peak, of which 29,232 are states.
    assert estimate.refusal(gpu_memory=39_000, reserve=0) is None
    assert "lower data.micro_batch_size" in estimate.refusal(gpu_memory=39_000, reserve=1_000)
    assert "parameter states alone do not fit" in estimate.refusal(gpu_memory=29_000, reserve=0)
    argv = ["--recipe", "emo_1b14b", "--world-size", "8", "--set", "model.expert_model_parallel_size=8"]
    assert main(argv) == EXIT_DOES_NOT_FIT  # micro-batch 4 without recomputation: ~76 GiB
    assert "does not fit" in capsys.readouterr().err
    assert main(argv + ["--set", "data.micro_batch_size=1"]) == 0


def test_more_parallelism_and_recomputation_use_less_memory():
    assert _flagship(8, "model.expert_model_parallel_size=8") < _flagship(8, "model.expert_model_parallel_size=4")
    assert _flagship(8, "model.expert_model_parallel_size=4", "model.tensor_model_parallel_size=2",
                     "model.sequence_parallel=True") < _flagship(8, "model.expert_model_parallel_size=4")
    assert _flagship(16, "model.expert_model_parallel_size=8") < _flagship(8, "model.expert_model_parallel_size=8")
    layout = ("model.expert_model_parallel_size=8",)
    assert (
        _flagship(8, *layout, recompute="full") < _flagship(8, *layout, recompute="selective") < _flagship(8, *layout)
    )
    assert _flagship(8, *layout, "data.micro_batch_size=2") > _flagship(8, *layout)


def test_earlier_pipeline_stages_hold_more_micro_batches():
    run = resolve_run("emo_1b14b", ("model.pipeline_model_parallel_size=4", "model.expert_model_parallel_size=8",
                                    "data.micro_batch_size=1"))
    stages = estimate_memory(run, world_size=32, vocab_size=100_278).stages
    activations = [stage.activations["none"] for stage in stages[:-1]]
    assert activations == sorted(activations, reverse=True) and len(set(activations)) == 3
