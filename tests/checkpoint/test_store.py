"""Checkpoints: atomic publication, verification, retention, and bit-exact resume."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_emo.checkpoint.store import (
    CheckpointError,
    find_latest,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_emo.model.document_batch import DocumentBatch
from megatron_emo.model.gpt import build_gpt_model
from megatron_emo.recipes import OptimConfig, get_recipe
from megatron_emo.routing.documents import TrainingPools
from megatron_emo.training.optimizer import optimizer_parts
from megatron_emo.training.step import BatchShape, build_trainer
from tests.conftest import make_config


def tiny_trainer(hidden=16):
    """The trainer of a tiny GPT model (megatron-core, CPU)."""
    config = make_config(hidden_size=hidden)
    model = build_gpt_model(config, max_sequence_length=16, rotary_base=10_000)
    trainer = build_trainer(model, config, OptimConfig(lr=0.1, min_lr=0.01, warmup_steps=2), BatchShape(16, 2, 1),
                            total_steps=10, device=torch.device("cpu"))
    return trainer


def training_state(trainer) -> dict:
    """What a checkpoint saves and loads of ``trainer``, as keyword arguments."""
    return {"model": trainer.model, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler}


def _step(trainer):
    tokens = torch.randint(3, 64, (2, 16))
    documents = DocumentBatch.of(tokens, 2, seed=0, step=0, sample_index=torch.arange(2),
                                 pools=TrainingPools.of(make_config()))
    trainer.train_step(lambda: iter([(tokens, tokens, torch.ones(2, 16), documents)]))


def _adam_moments(optimizer) -> list[torch.Tensor]:
    return [state["exp_avg"] for part in optimizer_parts(optimizer) for state in part.optimizer.state.values()]


def test_round_trip_restores_everything(tmp_path, megatron_cpu):
    trainer = tiny_trainer()
    for _ in range(3):
        _step(trainer)
    path = save_checkpoint(tmp_path, 3, **training_state(trainer), run=get_recipe("tiny"))
    assert find_latest(tmp_path) == path and json.loads((path / "run_config.json").read_text())["name"] == "tiny"
    expected_next = torch.rand(3)
    fresh = tiny_trainer()
    assert load_checkpoint(path, **training_state(fresh)) == 3
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored
    for a, b in zip(trainer.model[0].parameters(), fresh.model[0].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(_adam_moments(trainer.optimizer), _adam_moments(fresh.optimizer), strict=True):
        assert torch.equal(a, b)
    assert fresh.scheduler.num_steps == trainer.scheduler.num_steps
    for _ in range(2):  # the Adam step counts came back too: bias corrections, hence updates, agree
        torch.manual_seed(1)
        _step(trainer)
        torch.manual_seed(1)
        _step(fresh)
    for a, b in zip(trainer.model[0].parameters(), fresh.model[0].parameters()):
        assert torch.equal(a, b)


def test_tampered_truncated_and_incomplete_checkpoints_are_rejected(tmp_path, megatron_cpu):
    trainer = tiny_trainer()
    path = save_checkpoint(tmp_path, 1, **training_state(trainer), run=get_recipe("tiny"))
    state = max(path.glob("*.distcp"), key=lambda file: file.stat().st_size)  # a shard of tensors
    original = state.read_bytes()
    state.write_bytes(original[:-10])
    with pytest.raises(CheckpointError, match=f"{state.name} has .* bytes"):
        verify_checkpoint(path)
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    state.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match=f"{state.name} does not match its SHA-256"):
        load_checkpoint(path, **training_state(trainer))
    state.write_bytes(original)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        verify_checkpoint(path)


def test_other_model_shape_is_rejected_with_the_field(tmp_path, megatron_cpu):
    path = save_checkpoint(tmp_path, 1, **training_state(tiny_trainer(16)), run=get_recipe("tiny"))
    other = tiny_trainer(32)
    wider = get_recipe("tiny")
    wider.model["hidden_size"] = 32
    with pytest.raises(CheckpointError, match=r"final_layernorm.weight: checkpoint \(16,\) vs model \(32,\).*"
                                              r"model.hidden_size: checkpoint \d+ vs run 32"):
        load_checkpoint(path, **training_state(other), run=wider)


def test_unfinished_save_is_ignored_and_retention(tmp_path, megatron_cpu, caplog):
    trainer = tiny_trainer()
    run = get_recipe("tiny")
    run.train.keep_last, run.train.keep_every = 2, 3
    for step in (1, 2, 3, 4, 5, 6):  # each save applies the run's retention rules
        save_checkpoint(tmp_path, step, **training_state(trainer), run=run)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000005", "step_00000006"]
    (tmp_path / ".tmp-step_00000007").mkdir()  # a save killed half-way
    assert find_latest(tmp_path).name == "step_00000006"
    assert "interrupted save" in caplog.text


# ---------------------------------------------------------------------------------------------
# End to end, through the command line

def _command(output_dir, mode, save_interval=100):
    return [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny",
            "--set", "train.steps=10", "--set", "optim.warmup_steps=2", "--set", "train.log_interval=1",
            "--set", f"train.save_interval={save_interval}", "--set", "train.tensorboard=False",
            "--set", f"model.emo_router_mode={mode!r}", "--set", f"train.output_dir={str(output_dir)!r}"]


def _losses(output_dir):
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_records(output_dir, count, process, timeout=300):
    deadline = time.monotonic() + timeout
    metrics = output_dir / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run did not log {count} steps")


@pytest.mark.parametrize("mode", ["emo", "topk"])
def test_sigterm_saves_and_resume_is_bit_exact(tmp_path, mode):
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(reference, mode), check=True, capture_output=True, timeout=600)
    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_command(resumed, mode), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_records(resumed, 4, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "SIGTERM received" in stderr
    stopped_at = int(find_latest(resumed / "checkpoints").name.split("_")[1])
    assert 4 <= stopped_at < 10
    result = subprocess.run(_command(resumed, mode), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and f"at step {stopped_at}" in result.stderr
    assert _losses(resumed) == _losses(reference)  # exactly, every step


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    # Saving every step, a SIGKILL lands in or between saves; either way the newest published
    # checkpoint verifies and the run resumes from it.
    process = subprocess.Popen(_command(tmp_path, "emo", save_interval=1), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for_records(tmp_path, 3, process)
    helpers = psutil.Process(process.pid).children(recursive=True)  # checkpoint writer processes
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for helper in helpers:  # orphaned by the kill (a cluster's job cleanup would end them)
        with contextlib.suppress(psutil.NoSuchProcess):
            helper.kill()
    latest = find_latest(tmp_path / "checkpoints")
    verify_checkpoint(latest)
    result = subprocess.run(_command(tmp_path, "emo", save_interval=1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {latest}" in result.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


# ---------------------------------------------------------------------------------------------
# On a GPU: megatron-core's distributed optimizer, background saves, and weights across devices

def _gpu_command(output_dir, steps, *overrides):
    return [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny", "--set", f"train.steps={steps}",
            "--set", "optim.warmup_steps=2", "--set", "train.log_interval=1", "--set", "train.tensorboard=False",
            "--set", "model.bf16=True", "--set", f"train.output_dir={str(output_dir)!r}",
            *(arg for override in overrides for arg in ("--set", override))]


@pytest.mark.gpu
def test_gpu_background_saves_resume_and_cpu_weights_start_a_gpu_run(tmp_path):
    uninterrupted = subprocess.run(_gpu_command(tmp_path / "whole", 16), capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    first = subprocess.run(_gpu_command(tmp_path / "parts", 12, "train.async_save=True", "train.save_interval=4"),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "parts" / "checkpoints"
    assert find_latest(checkpoints).name == "step_00000012" and not list(checkpoints.glob(".tmp-*"))
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000008", "step_00000012"]  # keep_last=2
    resumed = subprocess.run(_gpu_command(tmp_path / "parts", 16, "train.async_save=True"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "at step 12" in resumed.stderr, resumed.stderr[-3000:]
    # Weights, fp32 main weights and Adam moments came back: the next steps follow the
    # uninterrupted run (bf16 kernels are not bit-reproducible, so closely rather than exactly).
    assert _losses(tmp_path / "parts")[12:] == pytest.approx(_losses(tmp_path / "whole")[12:], rel=2e-2)
    # A CPU run's checkpoint (fp32) starts a GPU run (bf16) from its weights.
    cpu = subprocess.run(_command(tmp_path / "cpu", "emo") + ["--set", "train.steps=3"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    init_from = f"train.init_from={str(find_latest(tmp_path / 'cpu' / 'checkpoints'))!r}"
    started = subprocess.run(_gpu_command(tmp_path / "from_cpu", 3, init_from), capture_output=True, text=True,
                             timeout=600)
    assert started.returncode == 0 and "started from the weights of" in started.stderr, started.stderr[-3000:]
