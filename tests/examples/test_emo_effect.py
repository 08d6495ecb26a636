"""examples/emo_effect end to end at a smoke size (two 2-step one-layer models, 256 tokens of
text per domain, evaluated after each step): every file and number it promises, for both
models, trained alike and side by side. The
measured CPU run is in benchmarks/results/2026-11-25_cpu_emo_effect.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "emo_effect" / "emo_effect.py"


def test_emo_effect_runs_end_to_end(tmp_path):
    # Both models train side by side (--concurrent), as the GPU curve runs.
    cmd = [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path), "--concurrent", "--calibration-tokens", "256",
           "--eval-tokens", "256", "--set", "train.steps=2", "--set", "optim.warmup_steps=1",
           "--set", "model.num_layers=1", "--set", "data.seq_length=64", "--set", "train.eval_interval=1",
           "--set", "train.eval_samples=8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "emo_effect.json").read_text())
    train_emo, _, train_topk, _ = summary["commands"]
    # The twins differ in the router mode and their output and cache folders only.
    twin = train_emo.replace("'emo'", "'topk'").replace(f"{tmp_path}/emo", f"{tmp_path}/topk")
    assert twin.replace(f"{tmp_path}/cache/emo", f"{tmp_path}/cache/topk") == train_topk
    for mode in ("emo", "topk"):
        result = summary["results"][mode]
        assert set(result["full"]) == {"code", "docs", "prose"}
        assert len(result["pruned"]) == 3 * 3
        for record in result["pruned"]:
            assert record["kept"] == max(2, round(record["fraction"] * 16))
            assert [len(layer) for layer in record["experts_kept_per_layer"]] == [record["kept"]]
            assert record["increase_pct"] == pytest.approx(
                100 * (record["perplexity"] / result["full"][record["domain"]]["perplexity"] - 1))
        assert (tmp_path / mode / "experts.png").is_file() and (tmp_path / mode / "hf" / "config.json").is_file()
    assert set(summary["targets"]) >= {"at_25pct_emo_at_most_half", "full_within_2pct"}
    assert (tmp_path / "pruning.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.md").read_text().count("| EMO |") == 5  # 3 domains, the mean, the analysis
    # The gap curve: an evaluation of both models after each of the two steps.
    assert [point["step"] for point in summary["curve"]] == [1, 2]
    for point in summary["curve"]:
        assert set(point["domains"]) == {"code", "docs", "prose"}
        gaps = [d["gap_pct"] for d in point["domains"].values()]
        assert point["mean_gap_pct"] == pytest.approx(sum(gaps) / 3)
        for domain in point["domains"].values():
            assert domain["gap_pct"] == pytest.approx(100 * (domain["emo"] / domain["topk"] - 1))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| step | code: EMO / standard (gap)" in (tmp_path / "results.md").read_text()
