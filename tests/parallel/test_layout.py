"""Layouts: expert padding, and impossible layouts refused with the constraint named."""

import pytest

from megatron_emo.config import ConfigError
from megatron_emo.parallel.layout import ExpertLayout, check_layout
from megatron_emo.testing.layouts import tiny_config


@pytest.mark.parametrize("ep_size, padded, local", [(1, 127, 127), (2, 128, 64), (8, 128, 16), (128, 128, 1)])
def test_127_experts_pad_to_a_multiple_of_ep(ep_size, padded, local):
    layouts = [ExpertLayout(127, ep_size, rank) for rank in range(ep_size)]
    assert {(layout.num_padded, layout.num_local) for layout in layouts} == {(padded, local)}
    # The ranks' experts tile [0, padded) in order.
    assert [layout.first_local for layout in layouts] == list(range(0, padded, local))


@pytest.mark.parametrize("world_size, layout, message", [
    (3, dict(tensor_model_parallel_size=2), "3 ranks cannot hold tensor_model_parallel_size=2"),
    (4, dict(expert_model_parallel_size=8), "expert_model_parallel_size=8 x expert_tensor_parallel_size=1 does not divide the 4 ranks"),
    (2, dict(context_parallel_size=2), "context parallelism is not supported yet"),
    (2, dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=1), "expert_tensor_parallel_size=1 differs"),
    (3, dict(tensor_model_parallel_size=3, num_attention_heads=6), "moe_ffn_hidden_size=8 is not divisible by expert_tensor_parallel_size=3"),
    (2, dict(pipeline_model_parallel_size=2, num_layers=3), "num_layers=3 cannot be split evenly"),
    (4, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, num_layers=2),
     "pipeline_model_parallel_size=2 x virtual_pipeline_model_parallel_size=2"),
])
def test_impossible_layouts_name_the_constraint(world_size, layout, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(tiny_config(**layout), world_size)


def test_possible_layouts_pass():
    for world_size, layout in [(8, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=4)),
                               (4, dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2)),
                               (2, dict(pipeline_model_parallel_size=2, num_layers=3, num_layers_in_first_pipeline_stage=1))]:
        check_layout(tiny_config(**layout), world_size)


def test_megatron_cores_own_checks_become_config_errors():
    from megatron_emo.recipes import get_recipe

    run = get_recipe("tiny")
    run.model["tensor_model_parallel_size"] = 3
    with pytest.raises(ConfigError, match=r"model: num_attention_heads \(4\) must be a multiple of tensor_model_parallel_size \(3\)"):
        run.emo_config(vocab_size=2048, eos_token_id=2, on_gpu=False)
