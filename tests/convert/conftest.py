"""Fixtures of the conversion tests: megatron-core on the CPU (shared with the model tests)."""

from tests.model.conftest import megatron_cpu  # noqa: F401  (pytest fixture)
