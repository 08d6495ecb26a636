"""Where a run starts: its own newest verified checkpoint, or a refusal that names the way out;
never a silent restart, a mix of two runs or a truncated run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_emo.checkpoint.store import CheckpointError, save_checkpoint
from megatron_emo.config import ConfigError
from megatron_emo.recipes import TrainConfig, get_recipe
from megatron_emo.training.run_folder import StartPoint, plan_start
from tests.checkpoint.test_store import tiny_trainer, training_state


def _run(output_dir, **fields):
    """The tiny recipe (as the checkpoints below were saved with) writing to ``output_dir``."""
    run = get_recipe("tiny")
    run.train = TrainConfig(output_dir=str(output_dir), **fields)
    return run


def _save(output_dir, steps, init_from=None):
    """Checkpoints of one tiny model at ``steps`` under ``output_dir/checkpoints``."""
    run = get_recipe("tiny")
    run.train.init_from, run.train.keep_last = init_from, 10
    state = training_state(tiny_trainer())
    return [save_checkpoint(output_dir / "checkpoints", step, **state, run=run) for step in steps]


def _truncate(checkpoint):
    shard = max(checkpoint.glob("*.distcp"), key=lambda file: file.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-10])


def test_fresh_folder_starts_at_step_zero(tmp_path, megatron_cpu):
    assert plan_start(_run(tmp_path)) == StartPoint()
    assert plan_start(_run(tmp_path, init_from="hf/init")) == StartPoint(init_from=Path("hf/init"))


def test_resume_takes_latest(tmp_path, megatron_cpu):
    _, newest = _save(tmp_path, (2, 4))
    assert plan_start(_run(tmp_path)) == StartPoint(checkpoint=newest)


def test_missing_latest_pointer_resumes_the_newest_verified_checkpoint(tmp_path, megatron_cpu, caplog):
    older, newest = _save(tmp_path, (2, 4))
    (tmp_path / "checkpoints" / "latest").unlink()
    assert plan_start(_run(tmp_path)).checkpoint == newest
    assert "latest is missing" in caplog.text
    _truncate(newest)
    assert plan_start(_run(tmp_path)).checkpoint == older


def test_corrupt_newest_checkpoint_falls_back_loudly_to_an_older_verified_one(tmp_path, megatron_cpu, caplog):
    oldest, older, newest = _save(tmp_path, (2, 4, 6))
    _truncate(newest)
    assert plan_start(_run(tmp_path)).checkpoint == older
    assert f"checkpoint {newest}" in caplog.text and f"resuming from {older}" in caplog.text
    # The newer checkpoint is set aside, so neither a later resume nor the retention rules count it.
    assert not newest.exists() and (newest.parent / ".stale-step_00000006").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == older.name
    _truncate(older)
    _truncate(oldest)
    with pytest.raises(
        CheckpointError, match=f"no checkpoint in .* verifies: checkpoint {older}.*; checkpoint {oldest}"
    ):
        plan_start(_run(tmp_path))


def test_stray_folders_are_not_checkpoints(tmp_path, megatron_cpu):
    (only,) = _save(tmp_path, (2,))
    (tmp_path / "checkpoints" / "step_old").mkdir()
    assert plan_start(_run(tmp_path)).checkpoint == only


def test_existing_run_is_refused_not_restarted(tmp_path, megatron_cpu):
    _save(tmp_path, (2,))
    with pytest.raises(ConfigError, match="already holds a run .* train.resume=False: resume it .*another "
                                          "train.output_dir"):
        plan_start(_run(tmp_path, resume=False))


def test_metrics_without_a_checkpoint_are_refused(tmp_path, megatron_cpu):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 5.0}\n')
    with pytest.raises(ConfigError, match="metrics of an earlier run but no checkpoint"):
        plan_start(_run(tmp_path))


def test_init_from_into_a_folder_of_another_run_is_refused(tmp_path, megatron_cpu):
    _save(tmp_path / "plain", (2,))
    with pytest.raises(ConfigError, match="train.init_from='hf/init'.*started from freshly initialised weights"):
        plan_start(_run(tmp_path / "plain", init_from="hf/init"))
    # The same init_from run, interrupted, resumes its own checkpoint (the path however spelled).
    (own,) = _save(tmp_path / "own", (2,), init_from="hf/init")
    assert plan_start(_run(tmp_path / "own", init_from="hf/./init")).checkpoint == own


def test_a_run_of_other_model_settings_is_refused_but_another_layout_resumes(tmp_path, megatron_cpu):
    (saved,) = _save(tmp_path, (2,))
    topk = _run(tmp_path)
    topk.model["emo_router_mode"] = "topk"
    with pytest.raises(ConfigError, match="other settings \\(model.emo_router_mode: checkpoint 'emo' vs run 'topk'\\)"):
        plan_start(topk)
    relaid = _run(tmp_path)
    relaid.model["expert_model_parallel_size"] = 2
    assert plan_start(relaid).checkpoint == saved


def _command(output_dir, *overrides):
    return [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny", "--set", "optim.warmup_steps=1",
            "--set", "train.log_interval=1", "--set", "train.save_interval=2", "--set", "train.eval_interval=0",
            "--set", "train.tensorboard=False", "--set", f"train.output_dir={str(output_dir)!r}",
            *(arg for override in overrides for arg in ("--set", override))]


def test_command_line_never_truncates_and_resumes_without_latest(tmp_path):
    first = subprocess.run(_command(tmp_path, "train.steps=4"), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "step 4 of 4: training loss" in first.stderr and "tools/convert_to_hf.py" in first.stderr  # the summary
    metrics = (tmp_path / "metrics.jsonl").read_text()

    refused = subprocess.run(_command(tmp_path, "train.steps=4", "train.resume=False"),
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr, refused.stderr[-2000:]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

    finished = subprocess.run(_command(tmp_path, "train.steps=4"), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0 and "already finished at step 4" in finished.stderr, finished.stderr[-2000:]

    (tmp_path / "checkpoints" / "latest").unlink()
    longer = subprocess.run(_command(tmp_path, "train.steps=6"), capture_output=True, text=True, timeout=600)
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resumed from" in longer.stderr and "step_00000004 at step 4" in longer.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
