"""How fast the optimizer step could be: the bytes it must move over the GPU's measured copy
bandwidth.

Per parameter, the distributed optimizer of a bf16 model with fp32 gradients (training/step.py)
at least reads the fp32 gradient for the norm (4 bytes); Adam reads the fp32 main weight,
gradient and both moments and writes the weight and moments back (16 + 12); the new weight is
read and written to the bf16 model copy (4 + 2). Clipping, when it scales, moves more: it is
left out, so the bound is one a fused clip-and-Adam would reach.
"""

import torch

OPTIMIZER_BYTES_PER_PARAM = 4 + 16 + 12 + 4 + 2


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy of ``gib`` GiB moves (read + write), the best of
    ``repeats``."""
    source = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # the first copy pays for nothing we want to time
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * source.numel() * 4 / best


def optimizer_memory_bound_ms(num_params: int, bandwidth: float) -> float:
    """Milliseconds the optimizer step of ``num_params`` parameters takes at ``bandwidth`` bytes/s."""
    return num_params * OPTIMIZER_BYTES_PER_PARAM / bandwidth * 1e3
