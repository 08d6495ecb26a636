"""Checkpoints move between parallel layouts: saved on one, loaded on another, same state and
the same Hugging Face export."""

import shutil

import pytest
import torch
from megatron.core import parallel_state

from megatron_emo.checkpoint.store import find_latest, load_checkpoint, read_tensors, save_checkpoint
from megatron_emo.convert.qwen2_moe import GPTSettings, to_hf_state_dict
from megatron_emo.model.gpt import build_model_chunks
from megatron_emo.recipes import OptimConfig, get_recipe
from megatron_emo.testing.distributed import run_distributed
from megatron_emo.testing.layouts import tiny_config
from megatron_emo.training.cpu_mode import cuda_on_cpu
from megatron_emo.training.distributed import init_model_parallel, process_group
from megatron_emo.training.step import BatchShape, build_trainer
from tests.training.conftest import small_run

ROUTED_7 = dict(num_moe_experts=8)  # 1 shared + 7 routed: padded to 8 on EP2 and EP4


def _resave(rank, world_size, layout, source, target):
    """Build the tiny model under ``layout``, load ``source`` (None: train one step from the
    initialisation instead) and save it as ``target``."""
    with cuda_on_cpu():
        config = tiny_config(**layout)
        init_model_parallel(config, seed=0)
        try:
            model = build_model_chunks(config, max_sequence_length=16, rotary_base=10_000)
            trainer = build_trainer(model, config, OptimConfig(warmup_steps=0), BatchShape(16, 1, 1), total_steps=4,
                                    device=torch.device("cpu"))
            if source is None:
                for param in (p for chunk in model for p in chunk.parameters()):
                    param.main_grad.copy_(torch.randn_like(param.main_grad))
                trainer.update()
                step = 1
            else:
                step = load_checkpoint(source, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
            save_checkpoint(target, step, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                            run=get_recipe("tiny"))
        finally:
            parallel_state.destroy_model_parallel()


def _tensors(root) -> dict:
    """Every tensor of the newest checkpoint under ``root`` (weights and AdamW moments), whole."""
    with process_group():
        return read_tensors(find_latest(root), optimizer=True)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("chain", [
    [(4, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2))],
    [(2, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, num_layers=4))],
    [(4, dict(expert_model_parallel_size=4, **ROUTED_7)), (2, dict(expert_model_parallel_size=2, **ROUTED_7))],
], ids=["tp2-sp-ep2", "pp2-vp2", "ep4-then-ep2-padded"])
def test_checkpoint_passes_through_parallel_layouts_unchanged(tmp_path, chain):
    one_process = {key: value for key, value in chain[0][1].items() if key in ("num_layers", "num_moe_experts")}
    run_distributed(_resave, 1, one_process, None, tmp_path / "0")
    for index, (world_size, layout) in enumerate(chain, start=1):
        run_distributed(_resave, world_size, layout, find_latest(tmp_path / str(index - 1)), tmp_path / str(index),
                        timeout=300)
    run_distributed(_resave, 1, one_process, find_latest(tmp_path / str(len(chain))), tmp_path / "back")
    one = _tensors(tmp_path / "0")
    assert any(name.startswith("optimizer.state.exp_avg_sq.") for name in one)
    for index in range(1, len(chain) + 1):
        _assert_same(one, _tensors(tmp_path / str(index)))
    _assert_same(one, _tensors(tmp_path / "back"))
    # The Hugging Face export of a parallel layout's checkpoint is the one-process export.
    config = tiny_config(**one_process)
    gpt = GPTSettings(rotary_base=10_000, max_position_embeddings=16)
    weights = {name: tensor for name, tensor in _tensors(tmp_path / "1").items() if not name.startswith("optimizer.")}
    exported = to_hf_state_dict(weights, config, gpt)
    expected = to_hf_state_dict({name: one[name] for name in weights}, config, gpt)
    _assert_same(exported, expected)


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
