"""Every parallel layout trains like one process: same loss, same router choices (experts and
gates, so the same pools), same gradients after one step — fp32 on CPU over gloo."""

import pytest
import torch

from megatron_emo.testing.distributed import run_distributed
from megatron_emo.testing.layouts import fixed_batch, run_layout

GLOBAL_BATCH, SEQ = 8, 16
TOKENS = fixed_batch(GLOBAL_BATCH, SEQ)

# name: (world size, layout fields, micro-batch size per data-parallel rank)
LAYOUTS = {
    "tp2": (2, dict(tensor_model_parallel_size=2), 4),
    "ep2": (2, dict(expert_model_parallel_size=2), 2),
    "ep4": (4, dict(expert_model_parallel_size=4), 1),
    "pp2": (2, dict(pipeline_model_parallel_size=2), 2),
    "dp2": (2, dict(), 2),
    "tp2_sp": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True), 4),
    "tp2_ep2": (4, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2), 2),
    "pp2_ep2": (4, dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2), 1),
    "dp4_ep2": (4, dict(expert_model_parallel_size=2), 1),
    "pp2_interleaved": (
        2, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, num_layers=4), 2
    ),
    "pp2_uneven": (2, dict(pipeline_model_parallel_size=2, num_layers=3, num_layers_in_first_pipeline_stage=1), 2),
}
MODEL_FIELDS = ("num_layers", "num_moe_experts")
"""Layout entries that change the model itself: the one-process run gets them too."""


def _data_parallel(world, layout):
    return world // (layout.get("tensor_model_parallel_size", 1) * layout.get("pipeline_model_parallel_size", 1))


def _single(micro_batch_size, model=None, steps=1, weights=None):
    return run_distributed(run_layout, 1, model or {}, micro_batch_size, TOKENS, weights, steps, timeout=300)[0]


def _compare(parallel, single):
    assert parallel["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert parallel["routes"].keys() == single["routes"].keys()
    for key, value in single["routes"].items():
        if key[0] == "indices":
            assert torch.equal(parallel["routes"][key], value), key
        else:
            torch.testing.assert_close(parallel["routes"][key], value, rtol=1e-5, atol=1e-6)
    assert parallel["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(parallel["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def single_runs():
    """One-process runs by micro-batch size and model changes, computed once."""
    cache = {}

    def get(micro_batch_size, **model):
        key = (micro_batch_size, tuple(sorted(model.items())))
        if key not in cache:
            cache[key] = _single(micro_batch_size, model)
        return cache[key]

    return get


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_equals_one_process(name, single_runs):
    world, layout, micro_batch_size = LAYOUTS[name]
    model = {field: value for field, value in layout.items() if field in MODEL_FIELDS}
    single = single_runs(micro_batch_size * _data_parallel(world, layout), **model)
    parallel = run_distributed(run_layout, world, layout, micro_batch_size, TOKENS, single["weights"], timeout=300)[0]
    _compare(parallel, single)


def test_padded_experts_on_ep2(single_runs):
    # 7 routed experts (a prime, like EMO's 127) on 2 expert-parallel ranks: 4 + 4 with one
    # padding expert that the router never reaches.
    layout = dict(expert_model_parallel_size=2, num_moe_experts=8)
    single = single_runs(4, num_moe_experts=8)
    parallel = run_distributed(run_layout, 2, layout, 2, TOKENS, single["weights"], timeout=300)[0]
    _compare(parallel, single)
    for name, grad in parallel["grads"].items():
        if name.endswith("experts.fc1"):
            assert grad.shape[0] == 7


def test_twenty_steps_on_dp4_ep2_follow_one_process():
    single = _single(4, steps=20)
    parallel = run_distributed(
        run_layout, 4, dict(expert_model_parallel_size=2), 1, TOKENS, single["weights"], 20, timeout=600
    )[0]
    assert parallel["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert single["losses"][-1] < single["losses"][0]
