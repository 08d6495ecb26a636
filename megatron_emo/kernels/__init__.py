"""Triton kernels of megatron_emo, installed as ``megatron_emo.kernels``.

Each op lives in ``kernels/<op>/`` with its public function in ``__init__.py``, a pure-PyTorch
``reference.py`` of the same signature, and ``triton_impl.py`` (``attention``: ``varlen_impl.py``,
PyTorch's variable-length flash kernel). ``backend.py`` picks between them per device. The lower
layer: nothing here imports the rest of the package but ``megatron_emo.logs``.
"""
