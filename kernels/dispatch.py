"""The implementation of a kernel op for a device, by the rule of every ``kernels/<op>/``.

:func:`megatron_emo.kernels.routing.select_path` decides: Triton on CUDA, Triton's interpreter
under ``TRITON_INTERPRET=1``, the op's PyTorch ``reference`` elsewhere. Each (op, path) is logged
once per process at INFO; a Triton path without an importable triton raises (never a silent
fallback to the reference).
"""

import importlib
import logging
from types import ModuleType

import torch

from megatron_emo.kernels.routing import select_path
from megatron_emo.logs import log_once

logger = logging.getLogger(__name__)


def implementation(op: str, device: torch.device) -> ModuleType:
    """``megatron_emo.kernels.<op>.reference`` or ``.triton_impl`` for tensors on ``device``."""
    path = select_path(device)
    log_once(logger, "%s: path = %s", op, path)
    if path == "reference":
        return importlib.import_module(f"megatron_emo.kernels.{op}.reference")
    try:
        return importlib.import_module(f"megatron_emo.kernels.{op}.triton_impl")
    except ImportError as error:
        raise RuntimeError(
            f"kernels.{op} on {device.type} needs triton, which failed to import ({error}); "
            "install triton. There is no silent fallback to the PyTorch reference."
        ) from error
