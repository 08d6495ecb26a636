"""The tiny recipe end to end through the command line, in its own process."""

import json
import subprocess
import sys

import pytest


def _train(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny",
           "--set", f"train.output_dir={str(tmp_path)!r}", *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["emo", "topk"])
def test_tiny_run_loss_falls(tmp_path, mode):
    result = _train(tmp_path, f"model.emo_router_mode={mode!r}", "train.steps=40", "optim.warmup_steps=5",
                    "train.log_interval=5")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.7, (first["loss"], last["loss"])
    for record in records:
        assert record["lb_loss"] > 0 and record["z_loss"] > 0 and record["tokens_per_s"] > 0
        assert len(record["load_max_over_mean"]) == 4  # one entry per MoE layer
    # 16 routed experts: EMO pools of 4..16 average about 10; top-k mode uses all of them.
    pools = [r["pool_experts"] for r in records]
    assert all(p < 13 for p in pools) if mode == "emo" else all(p == 16 for p in pools)
    assert (tmp_path / "tokenizer.model").is_file() and (tmp_path / "run_config.json").is_file()
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.emo_pool_min=1", "emo_pool_min"),
        ("model.emo_pool_min=20", "emo_pool_min"),
        ("model.not_a_field=1", "not_a_field"),
        ("train.steps='many'", "train.steps"),
        ("optim.warmup_steps=1000", "optim.warmup_steps"),
    ],
)
def test_bad_settings_fail_fast_with_the_field_named(tmp_path, override, message):
    result = _train(tmp_path, override)
    assert result.returncode == 2
    assert message in result.stderr and "error:" in result.stderr


@pytest.mark.gpu
def test_tiny_run_on_gpu_in_bf16(tmp_path):
    result = _train(tmp_path, "train.steps=30", "optim.warmup_steps=5", "train.log_interval=5",
                    "model.bf16=True", "train.tensorboard=False")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert "torch._grouped_mm" in result.stderr
