"""Run megatron-core on a machine without a GPU.

megatron-core assumes CUDA in a few places that matter on the CPU: device arguments
(``device=torch.cuda.current_device()``, ``.cuda()``), its RNG tracker
(``torch.cuda.get_rng_state``) and stream/synchronise calls. Inside :func:`cuda_on_cpu`:

- a ``TorchFunctionMode`` rewrites CUDA device arguments of tensor factories and ``.to``/``.cuda``
  to the CPU;
- ``torch.cuda`` RNG functions use the CPU generator, and ``current_device``, ``synchronize``,
  ``Stream``, ``current_stream`` and ``stream`` become CPU stand-ins;
- the gradient reduce-scatter and parameter all-gather of megatron-core's DDP buffers are plain
  copies on a group of one process. Gloo runs every collective on its own threads, and the
  copies it makes there start an OpenMP team per thread; once libgomp manages more threads than
  there are cores it stops spinning between parallel regions, so every parallel op of the step
  then waits for a thread wake-up (the tiny recipe's step: 0.52 s with gloo, 0.34 s without).
  Groups of several processes still go through gloo.

Entered only when no GPU is present (the trainer and the tests do it); never needed on a GPU.
"""

import contextlib
import functools
import importlib

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


def _local_when_alone(collective):
    """``collective(output, input, ...)`` (an all-gather or reduce-scatter into a tensor) as a
    copy when its group has one process, where both are the identity."""

    @functools.wraps(collective)
    def run(output, input, *args, group=None, async_op=False, **kwargs):
        if torch.distributed.get_world_size(group) > 1:
            return collective(output, input, *args, group=group, async_op=async_op, **kwargs)
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)
        return _NullEvent() if async_op else None

    return run


# megatron-core binds its DDP buffers' collectives to these module names at import.
_DDP_BUFFER_COLLECTIVES = [
    ("megatron.core.distributed.param_and_grad_buffer", name)
    for name in ("dist_all_gather_func", "dist_reduce_scatter_func")
]


def megatron_device():
    """The GPU as it is, or :func:`cuda_on_cpu` on a machine without one."""
    return contextlib.nullcontext() if torch.cuda.is_available() else cuda_on_cpu()


@contextlib.contextmanager
def cuda_on_cpu():
    """Map megatron-core's CUDA calls to the CPU for the duration of the block."""
    if torch.cuda.is_available():
        raise RuntimeError("cuda_on_cpu() is for machines without a GPU")
    # megatron-core calls the RNG state functions through torch.cuda.random as well.
    replacements = {(torch.cuda, name): stand_in for name, stand_in in _STAND_INS.items()}
    for name in ("get_rng_state", "set_rng_state"):
        replacements[torch.cuda.random, name] = _STAND_INS[name]
    for module_name, name in _DDP_BUFFER_COLLECTIVES:
        module = importlib.import_module(module_name)
        replacements[module, name] = _local_when_alone(getattr(module, name))
    saved = {(module, name): getattr(module, name) for module, name in replacements}
    for (module, name), replacement in replacements.items():
        setattr(module, name, replacement)
    try:
        with _CpuDeviceMode():
            yield
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)
