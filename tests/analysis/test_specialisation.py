"""Specialisation measures: they find the expert subsets a domain is forced to, and read 0 / log2(D)
at the two extremes."""

import math

import pytest
import torch

from megatron_emo.analysis.specialisation import mutual_information, summarise, top_experts
from megatron_emo.analysis.usage import UsageAccumulator

SUBSETS = {"code": [0, 5, 9], "docs": [1, 4, 11], "prose": [2, 7, 8]}
"""Three domains, each forced onto its own, interleaved quarter of 12 experts."""


def _forced_usage(num_layers=2, num_experts=12, top_k=2, docs_per_domain=4):
    """Router logits where every token of a domain strongly prefers the domain's subset."""
    accumulator = UsageAccumulator(SUBSETS, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    for domain, subset in SUBSETS.items():
        for doc in range(docs_per_domain):
            tokens = 5 + 3 * doc
            layers = []
            for _ in range(num_layers):
                logits = torch.randn(tokens, num_experts)
                logits[:, subset] += 20.0
                layers.append(logits)
            accumulator.add_document(domain, layers)
    return accumulator.result()


def test_the_forced_subsets_are_found_exactly():
    usage = _forced_usage()
    for layer in range(usage.num_layers):
        experts, share = top_experts(usage.selections[layer], 0.25)
        assert experts == list(SUBSETS.values())
        torch.testing.assert_close(share, torch.ones(3, dtype=torch.float64))
        assert mutual_information(usage.selections[layer]) == pytest.approx(math.log2(3))
    summary = summarise(usage, 0.25)
    assert summary["layers"][1]["top_experts"] == SUBSETS
    assert summary["top_share_mean"] == pytest.approx({d: 1.0 for d in SUBSETS})
    # Every document selects only its domain's 3 experts (top-2 of them per token).
    assert all(d <= 3 for docs in usage.distinct for d in docs.flatten().tolist())


def test_domains_that_route_alike_share_no_information():
    profile = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert mutual_information(torch.stack([profile, 2 * profile, 7 * profile])) == pytest.approx(0.0, abs=1e-12)
    _, share = top_experts(torch.ones(2, 8), 0.25)
    torch.testing.assert_close(share, torch.full((2,), 0.25, dtype=torch.float32))


def test_domains_count_equally_however_many_tokens_they_have():
    # Disjoint halves: one bit, even though the first domain has 10x the tokens.
    assert mutual_information(torch.tensor([[10.0, 10.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])) == pytest.approx(1.0)
    # Sharing one expert: p(e) = (1/4, 1/2, 1/4), so each domain has 0.5·log2(0.5/0.25) + 0.5·log2(1).
    assert mutual_information(torch.tensor([[20.0, 20.0, 0.0], [0.0, 20.0, 20.0]])) == pytest.approx(0.5)


def test_top_experts_ties_go_to_the_lower_index_and_the_fraction_is_checked():
    experts, share = top_experts(torch.tensor([[1.0, 3.0, 3.0, 3.0]]), 0.5)
    assert experts == [[1, 2]] and float(share[0]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="fraction"):
        top_experts(torch.ones(1, 4), 0.0)
