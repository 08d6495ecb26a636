"""Expert loads for grouped-GEMM tests and benchmarks: how N rows fall on E experts.

Kinds: ``uniform`` (every expert N/E rows, the remainder spread one each), ``zipf`` (expert of
rank r gets a share proportional to 1/r^1.2, in a shuffled expert order: a skewed router), and
``mostly_empty`` (three experts get every row, one of them a single row; the rest none).
"""

import torch

KINDS = ("uniform", "zipf", "mostly_empty")


def group_sizes(kind: str, num_rows: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """int64 ``[E]`` rows per expert, summing to ``num_rows`` (CPU tensor)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        sizes = torch.full((num_experts,), num_rows // num_experts, dtype=torch.int64)
        sizes[: num_rows % num_experts] += 1
        return sizes
    if kind == "zipf":
        share = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
        sizes = (share / share.sum() * num_rows).floor().to(torch.int64)
        sizes[0] += num_rows - int(sizes.sum())
        return sizes[torch.randperm(num_experts, generator=gen)]
    if kind == "mostly_empty":
        if num_experts < 3 or num_rows < 2:
            raise ValueError(f"mostly_empty needs >= 3 experts and >= 2 rows; got {num_experts}, {num_rows}")
        sizes = torch.zeros(num_experts, dtype=torch.int64)
        chosen = torch.randperm(num_experts, generator=gen)[:3]
        sizes[chosen] = torch.tensor([num_rows // 3, num_rows - num_rows // 3 - 1, 1])
        return sizes
    raise ValueError(f"unknown expert load kind {kind!r}; choose one of {KINDS}")
