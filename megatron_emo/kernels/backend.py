"""The implementation of a kernel op for a device, by the rule of every ``kernels/<op>/``.

:func:`select_path` decides: Triton on CUDA, Triton's interpreter under ``TRITON_INTERPRET=1``,
the op's PyTorch ``reference`` elsewhere. Triton reads ``TRITON_INTERPRET`` when the kernels
are defined, so it must be set before the process's first Triton import (in practice: in the
environment of a separate pytest process). Each (op, path) is logged once per process at INFO;
a Triton path without an importable triton raises (never a silent fallback to the reference).
"""

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

import torch

from megatron_emo.logs import log_once

logger = logging.getLogger(__name__)


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter, spelled as Triton's own switch
    (knobs.env_bool) reads it."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def select_path(device: torch.device) -> str:
    """The implementation a kernel op uses for tensors on ``device``.

    Returns:
        ``"triton"``, ``"triton-interpreter"`` or ``"reference"``.
    """
    if device.type == "cuda":
        return "triton"
    if triton_interpreting():
        return "triton-interpreter"
    return "reference"


def implementation(op: str, device: torch.device, *, name: Optional[str] = None) -> ModuleType:
    """``megatron_emo.kernels.<op>.reference`` or ``.triton_impl`` for tensors on ``device``.

    ``name`` is the op in the log line ``<name>: path = <path>`` (default ``op``), which the
    trainer's and the benchmark's path records key on.
    """
    path = select_path(device)
    log_once(logger, "%s: path = %s", name or op, path)
    if path == "reference":
        return importlib.import_module(f"megatron_emo.kernels.{op}.reference")
    try:
        return importlib.import_module(f"megatron_emo.kernels.{op}.triton_impl")
    except ImportError as error:
        raise RuntimeError(
            f"kernels.{op} on {device.type} needs triton, which failed to import ({error}); "
            "install triton. There is no silent fallback to the PyTorch reference."
        ) from error
