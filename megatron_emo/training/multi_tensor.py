"""Device-side stand-ins for megatron-core's apex-free multi-tensor fallbacks.

Without TransformerEngine or apex, megatron-core 0.16.1 clips gradients with pure-Python
fallbacks (``megatron.core.utils.local_multi_tensor_*``): its l2 norm reads every gradient's
norm on the host, one device synchronisation per tensor, and its scale runs a multiply and a
copy per tensor. These do the same with torch's multi-tensor ``_foreach`` kernels and never
wait for the device. :func:`install` puts them where megatron-core looks them up.
"""

import logging

import torch

from megatron_emo.logs import log_once

logger = logging.getLogger(__name__)


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The l2 norm of all tensors of ``tensor_lists[0]`` together, as a 1-element fp32 tensor on
    their device (megatron-core's ``multi_tensor_l2norm`` signature; per-tensor norms unused)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack([norm.float() for norm in norms])).reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """``tensor_lists[1][i] = tensor_lists[0][i] * factor`` for every i (in place when the two
    lists are the same tensors)."""
    sources, targets = tensor_lists
    if all(source is target for source, target in zip(sources, targets)):
        torch._foreach_mul_(targets, factor)
    elif factor == 1.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))


def install() -> None:
    """Replace megatron-core's Python fallbacks by :func:`l2_norm` and :func:`scale` (when it
    runs those fallbacks; TransformerEngine's or apex's kernels stay)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    replaced = []
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = l2_norm
        replaced.append("l2 norm")
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale
            replaced.append(f"scale ({module.__name__.rsplit('.', 1)[-1]})")
    if replaced:
        log_once(logger, "multi-tensor ops: path = torch foreach (%s)", ", ".join(replaced))
