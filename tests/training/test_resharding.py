"""Checkpoints move between parallel layouts: saved on one, loaded on another, same state and
the same Hugging Face export."""

import shutil

import pytest
import torch
from megatron.core import parallel_state

from megatron_emo.convert.qwen2_moe import GPTSettings, to_hf_state_dict
from megatron_emo.model.gpt import build_gpt_model
from megatron_emo.recipes import OptimConfig, get_recipe
from megatron_emo.testing.distributed import run_distributed
from megatron_emo.testing.layouts import tiny_config
from megatron_emo.training.checkpoint import STATE_FILE, find_latest, load_checkpoint, save_checkpoint
from megatron_emo.training.cpu_mode import cuda_on_cpu
from megatron_emo.training.distributed import init_model_parallel
from megatron_emo.training.optimizer import cpu_stepper
from tests.training.conftest import small_run


def _resave(rank, world_size, layout, source, target):
    """Build the tiny model under ``layout``, load ``source`` (None: train one step from the
    initialisation instead) and save it as ``target``."""
    with cuda_on_cpu():
        config = tiny_config(**layout)
        init_model_parallel(config, seed=0)
        try:
            model = build_gpt_model(config, max_sequence_length=16, rotary_base=10_000)
            stepper = cpu_stepper(model, OptimConfig(warmup_steps=0), total_steps=4)
            if source is None:
                for param in model.parameters():
                    param.grad = torch.randn_like(param)
                stepper.step()
                step = 1
            else:
                step = load_checkpoint(source, model=model, optimizer=stepper.optimizer, scheduler=stepper.scheduler)
            save_checkpoint(target, step, model=model, optimizer=stepper.optimizer, scheduler=stepper.scheduler,
                            run=get_recipe("tiny"))
        finally:
            parallel_state.destroy_model_parallel()


def _state(root):
    return torch.load(find_latest(root) / STATE_FILE, weights_only=False)


def _assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for moment in ("exp_avg", "exp_avg_sq"):
        assert a["optimizer"][moment].keys() == a["model"].keys()
        for name, value in a["optimizer"][moment].items():
            assert torch.equal(value, b["optimizer"][moment][name]), (moment, name)
    assert a["optimizer"]["step"] == b["optimizer"]["step"] == 1


@pytest.mark.parametrize("world_size, layout", [
    (4, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2)),
    (2, dict(pipeline_model_parallel_size=2)),
])
def test_checkpoint_passes_through_a_parallel_layout_unchanged(tmp_path, world_size, layout):
    run_distributed(_resave, 1, {}, None, tmp_path / "one")
    run_distributed(_resave, world_size, layout, find_latest(tmp_path / "one"), tmp_path / "parallel", timeout=300)
    run_distributed(_resave, 1, {}, find_latest(tmp_path / "parallel"), tmp_path / "back")
    one, parallel = _state(tmp_path / "one"), _state(tmp_path / "parallel")
    _assert_same_state(one, parallel)
    _assert_same_state(one, _state(tmp_path / "back"))
    # The Hugging Face export of the parallel layout's checkpoint is the one-process export.
    config, gpt = tiny_config(), GPTSettings(rotary_base=10_000, max_position_embeddings=16)
    exported = to_hf_state_dict(parallel["model"], config, gpt)
    expected = to_hf_state_dict(one["model"], config, gpt)
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


def _train(rank, world_size, run):
    from megatron_emo.training.loop import train

    return train(run)


def test_run_saved_on_ep2_resumes_on_one_process(tmp_path):
    two = small_run(tmp_path / "two", "train.steps=4", "train.save_interval=2", "model.expert_model_parallel_size=2",
                    "data.micro_batch_size=4", "data.global_batch_size=16")
    records = run_distributed(_train, 2, two, timeout=600)[-1]
    checkpoints = tmp_path / "one" / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(tmp_path / "two" / "run" / "checkpoints" / "step_00000002", checkpoints / "step_00000002")
    (checkpoints / "latest").write_text("step_00000002\n")
    one = small_run(tmp_path / "one", "train.steps=4", "data.micro_batch_size=8", "data.global_batch_size=16",
                    f"data.cache_dir={str(tmp_path / 'two' / 'cache')!r}")
    resumed = run_distributed(_train, 1, one, timeout=600)[0]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in records[2:]], rel=1e-4)
