"""Pure-PyTorch reference of ``megatron_emo.kernels.routing``: the package's router, re-exported.

The routing contract lives in one place, :mod:`megatron_emo.routing.reference`; this module only
gives the kernel folder the ``reference.route`` that every ``kernels/<op>/`` has.
"""

from megatron_emo.routing.reference import route

__all__ = ["route"]
