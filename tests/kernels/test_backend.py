"""The implementation rule of every kernel op (megatron_emo.kernels.backend)."""

import torch

from megatron_emo.kernels import backend


def test_select_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert backend.select_path(torch.device("cpu")) == "reference"
    assert backend.select_path(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.select_path(torch.device("cpu")) == "triton-interpreter"
    assert backend.select_path(torch.device("cuda")) == "triton"


def test_reference_module_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from megatron_emo.kernels.routing import reference

    assert backend.implementation("routing", torch.device("cpu")) is reference
