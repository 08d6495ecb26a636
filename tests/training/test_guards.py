"""Non-finite steps are skipped or stop the run with a checkpoint; spikes are logged."""

import json
import logging

import pytest

from megatron_emo.checkpoint.store import find_latest
from megatron_emo.training import loop, step
from megatron_emo.training.guards import NonFiniteStep, SpikeDetector
from tests.training.conftest import small_run as _run


@pytest.fixture
def nan_at_steps(monkeypatch):
    """Make the LM loss NaN in the forward passes of the given (1-based) steps."""
    def install(steps):
        original_microbatches, original_forward = loop.microbatches, step.forward_step
        current = [0]

        def microbatches(dataset, run, runtime, index, documents_of):
            current[0] = index
            return original_microbatches(dataset, run, runtime, index, documents_of)

        def forward_step(data_iterator, model):
            output, loss_func = original_forward(data_iterator, model)
            if current[0] + 1 in steps:
                output = output * float("nan")
            return output, loss_func

        monkeypatch.setattr(loop, "microbatches", microbatches)
        monkeypatch.setattr(step, "forward_step", forward_step)
    return install


def _records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_is_skipped_and_training_goes_on(tmp_path, nan_at_steps, caplog):
    nan_at_steps({3})
    with caplog.at_level(logging.WARNING):
        loop.train(_run(tmp_path))
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["loss"] != records[2]["loss"]  # NaN logged for the skipped step
    assert all(r["loss"] == r["loss"] for r in records[3:])
    assert "skipped step 3" in caplog.text


def test_stop_policy_saves_the_last_good_state_and_raises(tmp_path, nan_at_steps):
    nan_at_steps({3})
    with pytest.raises(NonFiniteStep, match="step 3"):
        loop.train(_run(tmp_path, "train.nan_policy='stop'"))
    assert find_latest(tmp_path / "run" / "checkpoints").name == "step_00000002"


def test_too_many_skips_in_a_row_stop(tmp_path, nan_at_steps):
    nan_at_steps({2, 3})
    with pytest.raises(NonFiniteStep, match=r"2 bad steps in a row"):
        loop.train(_run(tmp_path, "train.max_nan_skips=1"))


def test_spike_detector_logs(caplog):
    detector = SpikeDetector(factor=2.0)
    with caplog.at_level(logging.WARNING):
        for step, loss in enumerate([5.0, 4.9, 4.8, 15.0], start=1):
            detector.observe(step, loss)
    assert "loss spike at step 4" in caplog.text and "step 3" not in caplog.text
