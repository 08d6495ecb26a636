"""Run megatron-core on a machine without a GPU.

megatron-core assumes CUDA in a few places that matter on the CPU: device arguments
(``device=torch.cuda.current_device()``, ``.cuda()``), its RNG tracker
(``torch.cuda.get_rng_state``) and stream/synchronise calls. Inside :func:`cuda_on_cpu`:

- a ``TorchFunctionMode`` rewrites CUDA device arguments of tensor factories and ``.to``/``.cuda``
  to the CPU;
- ``torch.cuda`` RNG functions use the CPU generator, and ``current_device``, ``synchronize``,
  ``Stream``, ``current_stream`` and ``stream`` become CPU stand-ins.

Entered only when no GPU is present (the trainer and the tests do it); never needed on a GPU.
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, int):
        return not isinstance(device, bool)  # .to(..., non_blocking) passes a bool
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuDeviceMode(TorchFunctionMode):
    """Maps every CUDA device argument to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to":
            args = tuple("cpu" if _is_cuda(arg) else arg for arg in args)
        if name == "type" and len(args) == 1 and not kwargs:
            # megatron-core's optimizers accept parameters by their CUDA type names.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: work on the CPU is already done."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()  # megatron-core's MoE dispatcher synchronises on it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_STAND_INS = {
    "current_device": lambda: "cpu",
    "synchronize": lambda *args, **kwargs: None,
    "Stream": _NullStream,
    "current_stream": lambda *args, **kwargs: _NullStream(),
    "default_stream": lambda *args, **kwargs: _NullStream(),
    "stream": lambda stream=None: contextlib.nullcontext(),
    "get_rng_state": lambda device=None: torch.get_rng_state(),
    "set_rng_state": lambda state, device=None: torch.set_rng_state(state),
    "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
    "manual_seed_all": lambda seed: torch.default_generator.manual_seed(seed),
}


def megatron_device():
    """The GPU as it is, or :func:`cuda_on_cpu` on a machine without one."""
    return contextlib.nullcontext() if torch.cuda.is_available() else cuda_on_cpu()


@contextlib.contextmanager
def cuda_on_cpu():
    """Map megatron-core's CUDA calls to the CPU for the duration of the block."""
    if torch.cuda.is_available():
        raise RuntimeError("cuda_on_cpu() is for machines without a GPU")
    # megatron-core calls the RNG state functions through torch.cuda.random as well.
    targets = [(torch.cuda, name) for name in _STAND_INS]
    targets += [(torch.cuda.random, name) for name in ("get_rng_state", "set_rng_state")]
    saved = {(module, name): getattr(module, name) for module, name in targets}
    for module, name in targets:
        setattr(module, name, _STAND_INS[name])
    try:
        with _CpuDeviceMode():
            yield
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)
