"""megatron-core on the CPU for model tests: the ``megatron_cpu`` fixture now lives in
tests/conftest.py (the dataset tests need it too); re-exported here for importers."""

from tests.conftest import megatron_cpu  # noqa: F401  (pytest fixture)
