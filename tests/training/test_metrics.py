"""Step metrics: the router's unused-expert fraction, the record's per-layer summary, the
console/JSONL/TensorBoard/W&B writers (W&B as a fake module that records its calls), and
tools/plot_metrics.py on records written by the writer."""

import importlib.machinery
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from megatron_emo.config import ConfigError
from megatron_emo.recipes import apply_override
from megatron_emo.routing.metrics import RoutingMetrics
from megatron_emo.training.loop import _router_summary
from megatron_emo.training.metrics import MetricsWriter, format_record, scalars
from megatron_emo.validate import validate_run
from tests.conftest import load_tool

from .conftest import small_run

plot_metrics = load_tool("plot_metrics")


def _record(metrics, counts):
    probs = torch.ones(3, len(counts))  # every expert in the pool
    metrics.record(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(counts, dtype=torch.float32), probs)


def test_unused_experts_over_the_whole_step():
    metrics = RoutingMetrics(4)
    _record(metrics, [2.0, 0.0, 0.0, 1.0])
    _record(metrics, [0.0, 0.0, 3.0, 0.0])
    stats = metrics.read()
    # Only expert 1 got no token in either micro-batch: 1/4, not the mean (2/4 + 3/4) / 2.
    assert stats["unused_experts"] == 0.25
    assert stats["load_max_over_mean"] == pytest.approx(3 / 6 * 4)
    _record(metrics, [1.0, 1.0, 1.0, 1.0])
    assert metrics.read()["unused_experts"] == 0.0  # the read reset the counts


def test_router_summary_lists_per_layer():
    layers = [{"lb_loss": 1.0, "z_loss": 2.0, "pool_experts": 4.0, "load_max_over_mean": 1.23456,
               "unused_experts": 0.25},
              {},  # a router that recorded nothing since the last read
              {"lb_loss": 3.0, "z_loss": 4.0, "pool_experts": 8.0, "load_max_over_mean": 2.0,
               "unused_experts": 0.0625}]
    summary = _router_summary(layers)
    assert summary == {"lb_loss": 2.0, "z_loss": 3.0, "pool_experts": 6.0,
                       "load_max_over_mean": [1.235, 2.0], "unused_experts": [0.25, 0.062]}
    assert _router_summary([{}, {}]) == {}


def test_console_line_shows_the_unused_mean():
    line = format_record({"step": 3, "loss": 2.5, "load_max_over_mean": [1.5, 2.0],
                          "unused_experts": [0.25, 0.125]})
    assert line == "step 3 | loss 2.5 | load_max_over_mean [1.50 2.00] | unused_experts 0.188"


def test_scalar_tags():
    tags = scalars({"step": 3, "loss": 2.5, "unused_experts": [0.25, 0.125]})
    assert tags == {"train/loss": 2.5, "router/unused_experts/layer1": 0.25,
                    "router/unused_experts/layer2": 0.125}


class FakeWandb(types.ModuleType):
    """Stands in for ``wandb``: ``init`` returns itself as the run; every call is recorded."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what find_spec reports
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, data, step):
        self.calls.append(("log", dict(data), step))

    def finish(self):
        self.calls.append(("finish",))


def _records(num_steps, offset=0.0):
    return [{"step": step, "loss": 5.0 - step / 10 + offset, "lr": 1e-3, "lb_loss": 1.1,
             "load_max_over_mean": [1.5, 1.25], "unused_experts": [0.125, 0.0]}
            for step in range(1, num_steps + 1)]


def test_wandb_logs_the_tensorboard_scalars_and_config(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = small_run(tmp_path, "train.tensorboard=True", "train.wandb_project='emo-tests'")
    validate_run(run)
    writer = MetricsWriter(run, enabled=True)
    for record in _records(3):
        writer.write(record)
    writer.write_eval(3, {"eval/code/pool8": 4.5})
    writer.close()

    (name, init), *logs, finish = fake.calls
    assert name == "init" and finish == ("finish",)
    assert init["project"] == "emo-tests" and init["name"] == "tiny"
    assert init["config"]["train"]["wandb_project"] == "emo-tests"
    assert init["config"]["model"]["num_moe_experts"] == 17
    logged = {}
    for _, data, step in logs:
        for tag, value in data.items():
            logged.setdefault(tag, {})[step] = value
    tensorboard = plot_metrics.read_tensorboard(Path(run.train.output_dir) / "tensorboard")
    assert set(logged) == set(tensorboard)
    assert "router/unused_experts/layer1" in logged and "eval/code/pool8" in logged
    for tag, values in tensorboard.items():
        assert logged[tag] == pytest.approx(values)  # TensorBoard keeps float32


def test_wandb_missing_fails_at_validation(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an uninstalled package looks like
    run = small_run(tmp_path, "train.wandb_project='emo-tests'")
    with pytest.raises(ConfigError, match=r"train\.wandb_project='emo-tests'.*pip install wandb"):
        validate_run(run)
    apply_override(run, "train.wandb_project=None")
    validate_run(run)


def test_resume_drops_later_steps_from_jsonl_and_tensorboard(tmp_path):
    run = small_run(tmp_path, "train.tensorboard=True")
    run_dir = Path(run.train.output_dir)
    writer = MetricsWriter(run, enabled=True)
    for record in _records(4):
        writer.write(record)
    writer.close()
    # TensorBoard reads event files in name order, and the names start with the time in seconds.
    time.sleep(1.1)
    # The run died after step 4 with a checkpoint at step 2: steps 3 and 4 will run again.
    writer = MetricsWriter(run, enabled=True, resume_step=2)
    writer.jsonl.flush()
    writer.tensorboard.flush()  # its events are written by a background thread
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert plot_metrics.read_tensorboard(run_dir / "tensorboard")["train/loss"] == pytest.approx({1: 4.9, 2: 4.8})
    writer.write(_records(3, offset=1.0)[2])
    writer.close()
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == [4.9, 4.8, 5.7]
    tensorboard = plot_metrics.read_tensorboard(run_dir / "tensorboard")
    assert tensorboard["train/loss"] == pytest.approx({1: 4.9, 2: 4.8, 3: 5.7})


def _write_run(root, name, records):
    run = small_run(root, "train.tensorboard=True", f"train.output_dir={str(root / name)!r}")
    writer = MetricsWriter(run, enabled=True)
    for record in records:
        writer.write(record)
    writer.close()
    return Path(run.train.output_dir)


def test_plot_tool(tmp_path):
    first = _write_run(tmp_path, "a", _records(4))
    twin = _write_run(tmp_path, "b", _records(4))
    shifted = _write_run(tmp_path, "c", _records(4)[:2] + _records(4, offset=0.25)[2:])

    for source in ("jsonl", "tensorboard"):
        png = tmp_path / f"grid_{source}.png"
        assert plot_metrics.main([str(first), "--source", source, "--output", str(png)]) == 0
        assert png.stat().st_size > 10_000
    # Both sources give the same series (TensorBoard's in float32).
    from_jsonl, from_events = plot_metrics.load_run(first, "jsonl"), plot_metrics.load_run(first, "tensorboard")
    assert set(from_jsonl) == set(from_events)
    assert from_events["router/unused_experts/layer1"] == pytest.approx(from_jsonl["router/unused_experts/layer1"])

    png = tmp_path / "same.png"
    assert plot_metrics.main([str(first), "--compare", str(twin), "--output", str(png)]) == 0
    report = json.loads(png.with_suffix(".json").read_text())
    assert report["identical"] and report["max_abs_difference"] == 0.0 and report["common_steps"] == 4
    assert report["runs"]["a"]["loss"] == [r["loss"] for r in _records(4)]

    png = tmp_path / "shifted.png"
    assert plot_metrics.main([str(first), "--compare", str(shifted), "--output", str(png)]) == 0
    report = json.loads(png.with_suffix(".json").read_text())
    assert not report["identical"] and report["max_abs_difference"] == pytest.approx(0.25)

    assert plot_metrics.main([str(tmp_path / "missing")]) == plot_metrics.EXIT_BAD_INPUT
