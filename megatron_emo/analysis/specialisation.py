"""How specialised the experts are: measures on a domain × expert selection matrix.

- **Top-fraction share**: the share of a domain's expert selections that fall on its own top
  ``fraction`` of the experts (its most selected ones). Uniform use gives ``fraction``; a domain
  that runs only on a set of that size gives 1. This is what pruning to that fraction keeps.
- **Mutual information** between domain and selected expert, in bits, with every domain weighted
  equally (so a large domain does not dominate): 0 when all domains use the experts alike,
  ``log2(D)`` when the domains use disjoint experts.
- **Distinct experts per document**: from :class:`~megatron_emo.analysis.usage.ExpertUsage`,
  how many experts one document needs.
"""

import math

import torch

from megatron_emo.analysis.usage import ExpertUsage


def expert_given_domain(selections: torch.Tensor) -> torch.Tensor:
    """``[D, E]`` counts → ``p(expert | domain)``, each row summing to 1 (a zero row stays 0)."""
    totals = selections.sum(-1, keepdim=True)
    return selections / totals.clamp_min(torch.finfo(selections.dtype).tiny)


def top_experts(selections: torch.Tensor, fraction: float) -> tuple[list[list[int]], torch.Tensor]:
    """Each domain's ``max(1, round(fraction × E))`` most selected experts (ties to the lower
    index, ascending in the list) and the share of its selections they carry (``[D]``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    keep = max(1, round(fraction * selections.shape[-1]))
    p = expert_given_domain(selections)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :keep]
    share = torch.gather(p, -1, order).sum(-1)
    return [sorted(row.tolist()) for row in order], share


def mutual_information(selections: torch.Tensor) -> float:
    """``I(domain; expert)`` in bits for ``[D, E]`` selection counts, domains weighted equally."""
    p = expert_given_domain(selections.double())
    marginal = p.mean(0, keepdim=True)
    ratio = torch.where(p > 0, p / marginal, torch.ones_like(p))  # 0 · log 0 = 0
    return float((p * torch.log2(ratio)).sum(-1).mean())


def summarise(usage: ExpertUsage, fraction: float = 0.25) -> dict:
    """A JSON-ready summary: per layer the measures above and the matrices, and their means."""
    layers = []
    for layer in range(usage.num_layers):
        selections = usage.selections[layer]
        experts, share = top_experts(selections, fraction)
        layers.append({
            "layer": layer,
            "mutual_information_bits": mutual_information(selections),
            "top_share": dict(zip(usage.domains, share.tolist())),
            "top_experts": dict(zip(usage.domains, experts)),
            "distinct_experts_per_document_mean": {
                domain: float(docs[:, layer].double().mean()) if len(docs) else None
                for domain, docs in zip(usage.domains, usage.distinct)},
            "selections": selections.tolist(),
            "probability": usage.probability[layer].tolist(),
        })

    def mean(key):
        return {domain: sum(layer[key][domain] for layer in layers) / len(layers) for domain in usage.domains}

    mi = [layer["mutual_information_bits"] for layer in layers]
    return {
        "domains": usage.domains,
        "num_layers": usage.num_layers,
        "num_routed_experts": usage.num_experts,
        "top_k": usage.top_k,
        "tokens": dict(zip(usage.domains, usage.tokens.tolist())),
        "documents": dict(zip(usage.domains, (len(docs) for docs in usage.distinct))),
        "top_fraction": fraction,
        "mutual_information_bits_mean": sum(mi) / len(mi),
        "mutual_information_max_bits": math.log2(len(usage.domains)),
        "top_share_mean": mean("top_share"),
        "distinct_experts_per_document_mean": {
            domain: float(docs.double().mean()) if len(docs) else None
            for domain, docs in zip(usage.domains, usage.distinct)},
        "layers": layers,
    }
