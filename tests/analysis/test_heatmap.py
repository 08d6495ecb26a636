"""Heat maps: clustering puts the experts of one domain side by side; the PNG is written."""

from megatron_emo.analysis.heatmap import expert_order, plot_heatmaps
from tests.analysis.test_specialisation import SUBSETS, _forced_usage


def test_clustering_puts_each_domain_s_experts_together():
    usage = _forced_usage()
    order = expert_order(usage.selections[0])
    assert sorted(order) == list(range(12))
    positions = {domain: sorted(order.index(e) for e in subset) for domain, subset in SUBSETS.items()}
    for domain, where in positions.items():
        assert where == list(range(where[0], where[0] + 3)), (domain, order)


def test_heatmaps_are_written(tmp_path):
    plot_heatmaps(_forced_usage(), tmp_path / "experts.png", title="forced")
    assert (tmp_path / "experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
