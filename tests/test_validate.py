"""The checks of a run's settings (megatron_emo.validate): each bad setting fails up front, by name."""

import re

import pytest
import torch

from megatron_emo.config import ConfigError
from megatron_emo.recipes import apply_override, get_recipe
from megatron_emo.validate import (
    check_estimable,
    check_layout,
    check_world,
    validate_run,
    validate_training_run,
)
from tests.conftest import make_config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(emo_pool_min=9, emo_pool_max=8), "emo_pool_min"),
        (dict(emo_pool_min=1), "emo_pool_min"),  # routed top-k is 2
        (dict(emo_eval_pool=1), "emo_eval_pool"),
        (dict(emo_eos_token_id=-1), "emo_eos_token_id"),
        (dict(emo_eos_token_id=64), "emo_eos_token_id"),  # vocabulary is 64
        (dict(emo_num_shared_experts=9), "emo_num_shared_experts"),
        (dict(emo_num_shared_experts=12), "emo_num_shared_experts"),
        (dict(emo_num_shared_experts=-1), "emo_num_shared_experts"),
        (dict(moe_router_topk=1), "moe_router_topk"),  # 1 shared: zero routed choices
        (dict(moe_router_topk=10), "moe_router_topk"),  # 9 routed choices > 8 routed experts
        (dict(emo_router_mode="standard"), "emo_router_mode"),
        (dict(num_moe_experts=None), "num_moe_experts"),
        (dict(num_moe_experts=0), "num_moe_experts"),
        (dict(emo_lb_loss_weight=-0.1), "emo_lb_loss_weight"),
        (dict(emo_z_loss_weight=-1e-3), "emo_z_loss_weight"),
        (dict(emo_vocab_size=0, emo_eos_token_id=0), "emo_vocab_size"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(cuda_graph_impl="local"), "cuda_graph_impl"),
        (dict(cross_entropy_loss_fusion=True), "cross_entropy_loss_fusion"),
    ],
)
def test_bad_model_field_is_named_when_the_config_is_built(overrides, field):
    with pytest.raises(ConfigError) as excinfo:
        make_config(**overrides)
    # The message leads with the offending field and its value.
    assert str(excinfo.value).startswith(f"{field}="), str(excinfo.value)


def test_unsupported_megatron_option_names_the_value_that_works():
    with pytest.raises(ConfigError, match=r"attention_dropout=0.1 is not supported \(.*no dropout\): leave it at 0.0"):
        make_config(attention_dropout=0.1)


def _layout_config(**layout):
    return make_config(pipeline_dtype=torch.float32, **layout)


@pytest.mark.parametrize("world_size, layout, message", [
    (3, dict(tensor_model_parallel_size=2), "3 ranks cannot hold tensor_model_parallel_size=2"),
    (4, dict(expert_model_parallel_size=8),
     "expert_model_parallel_size=8 x expert_tensor_parallel_size=1 does not divide the 4 ranks"),
    (2, dict(context_parallel_size=2), "context parallelism is not supported yet"),
    (2, dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1), "expert_tensor_parallel_size=1 differs"),
    (3, dict(tensor_model_parallel_size=3, num_attention_heads=6),
     "moe_ffn_hidden_size=8 is not divisible by expert_tensor_parallel_size=3"),
    (2, dict(pipeline_model_parallel_size=2, num_layers=3), "num_layers=3 cannot be split evenly"),
    (4, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, num_layers=2),
     "pipeline_model_parallel_size=2 x virtual_pipeline_model_parallel_size=2"),
])
def test_impossible_layouts_name_the_constraint(world_size, layout, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_layout(_layout_config(**layout), world_size)


def test_possible_layouts_pass():
    layouts = [
        (8, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=4)),
        (4, dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2)),
        (2, dict(pipeline_model_parallel_size=2, num_layers=3, num_layers_in_first_pipeline_stage=1)),
    ]
    for world_size, layout in layouts:
        check_layout(_layout_config(**layout), world_size)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("data.global_batch_size=12", "global_batch_size"),
        ("optim.min_lr=1.0", "min_lr"),
        ("train.steps=0", "train.steps"),
        ("gpt.rotary_base=0", "gpt.rotary_base=0 must be positive"),
        ("optim.schedule='wsd'", "anneal_steps"),
    ],
)
def test_run_validation(assignment, message):
    run = get_recipe("tiny")
    apply_override(run, assignment)
    with pytest.raises(ConfigError, match=message):
        validate_run(run)


def test_training_run_checks_the_model_and_the_data_for_its_length():
    run = get_recipe("tiny")
    validate_training_run(run)
    apply_override(run, "model.moe_router_topk=40")
    with pytest.raises(ConfigError, match="moe_router_topk=40"):
        validate_training_run(run)
    with pytest.raises(ConfigError, match="data.blend is empty"):
        validate_training_run(get_recipe("emo_1b14b"))


def _run_and_config(*assignments):
    run = get_recipe("tiny")
    for assignment in assignments:
        apply_override(run, assignment)
    return run, run.emo_config(vocab_size=2048, eos_token_id=3, on_gpu=False)


@pytest.mark.parametrize(
    "assignments, world_size, on_gpu, message",
    [
        (("train.async_save=True",), 1, False, "train.async_save needs a GPU"),
        ((), 4, True,
         "data.global_batch_size=16 is not a multiple of data.micro_batch_size x data-parallel size = 8 x 4"),
        (("model.tensor_model_parallel_size=4", "model.sequence_parallel=True", "data.seq_length=254"), 4, True,
         "data.seq_length=254 does not split over the tensor-parallel size 4"),
        (("model.pipeline_model_parallel_size=2", "model.virtual_pipeline_model_parallel_size=2",
          "data.global_batch_size=8"), 2, True,
         "at least pipeline_model_parallel_size=2 micro-batches"),
        (("model.expert_model_parallel_size=3",), 2, True, "expert_model_parallel_size=3"),
    ],
)
def test_world_checks_name_the_setting(assignments, world_size, on_gpu, message):
    run, config = _run_and_config(*assignments)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_world(run, config, world_size, on_gpu=on_gpu)


def test_world_checks_pass_a_run_that_fits():
    run, config = _run_and_config("train.async_save=True")
    check_world(run, config, 2, on_gpu=True)


def test_estimator_refuses_what_its_formulas_do_not_cover():
    _, config = _run_and_config("model.recompute_granularity='selective'", "model.recompute_modules=['layernorm']")
    with pytest.raises(ConfigError, match="core_attn"):
        check_estimable(config)
