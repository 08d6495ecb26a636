"""End-to-end training throughput benchmark (tools/benchmark_throughput.py): the compared
models, synthetic data, the per-component time breakdown, one case's measurement, the report."""
