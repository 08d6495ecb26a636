"""Expert subsets: selection, pruned folders that stock transformers loads, and their routing."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from megatron_emo.convert import hf_folder  # noqa: E402
from megatron_emo.convert.prune import (  # noqa: E402
    METADATA,
    layer_statistics,
    perplexity,
    restricted_routing,
    select_experts,
    write_pruned,
)
from tests.convert.test_qwen2_moe import _load_stock, _model  # noqa: E402


@pytest.fixture
def exported(megatron_cpu, tmp_path):
    """A tiny random model (2 layers, 8 routed + 1 shared, top-2) exported to an HF folder."""
    model, config, gpt = _model("emo")
    hf_folder.save_hf_model(tmp_path / "full", model.state_dict(), config, gpt)
    return tmp_path / "full", _load_stock(tmp_path / "full")


def _batches(count=3, length=24, vocab=60):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(4, vocab, (1, length), generator=generator) for _ in range(count)]


@pytest.mark.parametrize("method", ["usage", "hits", "random"])
def test_pruned_model_routes_like_the_full_model_restricted(exported, tmp_path, method):
    path, full = exported
    batches = _batches()
    kept = select_experts(full, batches, 3, method)
    assert len(kept) == full.config.num_hidden_layers and all(len(k) == 3 and k == sorted(k) for k in kept)
    write_pruned(path, tmp_path / "pruned", kept, method=method, calibration={"test": True})
    pruned = _load_stock(tmp_path / "pruned")  # stock transformers, every weight in place
    assert pruned.config.num_experts == 3 and pruned.config.num_experts_per_tok == full.config.num_experts_per_tok
    metadata = json.loads((tmp_path / "pruned" / METADATA).read_text())
    assert metadata["experts_kept_per_layer"] == kept and metadata["method"] == method
    assert metadata["original_num_experts"] == full.config.num_experts
    with torch.no_grad(), restricted_routing(full, dict(enumerate(kept))):
        for input_ids in batches:
            torch.testing.assert_close(pruned(input_ids=input_ids).logits, full(input_ids=input_ids).logits,
                                       rtol=1e-5, atol=1e-5)
    # Restricting changes the model (else the comparison above proves nothing).
    with torch.no_grad():
        assert not torch.allclose(pruned(input_ids=batches[0]).logits, full(input_ids=batches[0]).logits)


def test_usage_keeps_the_experts_with_the_most_router_probability(exported):
    _, full = exported
    batches = _batches()
    kept = select_experts(full, batches, 3, "usage")
    mean, hits, tokens = layer_statistics(full, batches, 0, {})
    assert tokens == 3 * 24 and hits.sum() == tokens * full.config.num_experts_per_tok
    assert kept[0] == sorted(torch.sort(mean, descending=True, stable=True).indices[:3].tolist())
    # Layer 1 is chosen with layer 0 already restricted.
    mean1, _, _ = layer_statistics(full, batches, 1, {0: kept[0]})
    assert kept[1] == sorted(torch.sort(mean1, descending=True, stable=True).indices[:3].tolist())


def test_random_is_seeded():
    class Config:
        num_experts, num_experts_per_tok, num_hidden_layers = 8, 2, 3

    class Model:
        config = Config()

    assert select_experts(Model(), [], 4, "random", seed=1) == select_experts(Model(), [], 4, "random", seed=1)
    assert select_experts(Model(), [], 4, "random", seed=1) != select_experts(Model(), [], 4, "random", seed=2)


@pytest.mark.parametrize("keep, message", [(9, "at most the 8"), (1, "routed top-k")])
def test_bad_k_is_refused(exported, keep, message):
    with pytest.raises(ValueError, match=message):
        select_experts(exported[1], _batches(1), keep, "usage")


def test_perplexity_is_exp_of_the_mean_cross_entropy(exported):
    _, full = exported
    batches = _batches(2, 10)
    ppl, count = perplexity(full, batches)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(full(input_ids=b).logits[0, :-1], b[0, 1:], reduction="sum")
                  for b in batches]
    assert count == 18 and abs(ppl - torch.exp(sum(losses) / 18).item()) < 1e-3 * ppl


def test_a_log_line_per_layer(exported, caplog):
    with caplog.at_level("INFO", logger="megatron_emo.convert.prune"):
        select_experts(exported[1], _batches(), 3, "hits", progress=True)
    assert [record.getMessage() for record in caplog.records] == [
        f"selecting the experts of layer {layer} of 2 over 3 rows" for layer in range(2)]
