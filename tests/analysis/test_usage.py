"""Usage matrices of a stock Qwen2-MoE model: the counts add up, per domain and per document."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402

from megatron_emo.analysis.usage import collect_usage, document_rows  # noqa: E402


def tiny_qwen2_moe(vocab_size=300, num_experts=8, top_k=2):
    """A random 2-layer Qwen2-MoE (8 routed experts, top-2, one shared expert)."""
    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            shared_expert_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, num_experts=num_experts, num_experts_per_tok=top_k,
                            norm_topk_prob=False, max_position_embeddings=64, decoder_sparse_step=1)
    model = Qwen2MoeForCausalLM(config).eval()
    with torch.no_grad():  # a sharper router than the init's, so experts differ in use
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model


def test_document_rows_cut_each_document_on_its_own():
    assert [r.tolist() for r in document_rows(list(range(10)), 4)] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]
    assert [r.shape[1] for r in document_rows(list(range(9)), 4)] == [4, 4]  # a last single token predicts nothing
    assert document_rows([7], 4) == []


def test_rows_sum_to_top_k_times_the_tokens():
    model = tiny_qwen2_moe()
    generator = torch.Generator().manual_seed(1)
    lengths = {"a": [30, 7, 50], "b": [12], "c": [64, 65]}
    documents = {domain: [document_rows(torch.randint(4, 300, (n,), generator=generator).tolist(), 16)
                          for n in sizes] for domain, sizes in lengths.items()}
    usage = collect_usage(model, documents)
    # Every token but a single trailing one per document is routed.
    tokens = torch.tensor([sum(n - (n % 16 == 1) for n in sizes) for sizes in lengths.values()])
    assert usage.tokens.tolist() == tokens.tolist()
    assert usage.selections.shape == (2, 3, 8)
    torch.testing.assert_close(usage.selections.sum(-1), (2 * tokens).double().expand(2, 3))
    torch.testing.assert_close(usage.probability.sum(-1), tokens.double().expand(2, 3))
    assert [len(d) for d in usage.distinct] == [3, 1, 2]
    # Distinct experts of the first document, layer 0, from the model's own router output.
    logits = torch.cat([model(input_ids=row, output_router_logits=True).router_logits[0]
                        for row in documents["a"][0]])
    expected = torch.topk(torch.softmax(logits, -1), 2, dim=-1).indices.unique().numel()
    assert int(usage.distinct[0][0, 0]) == expected
    assert int(usage.distinct[1][0].max()) <= 8


def test_a_log_line_per_domain(caplog):
    documents = {"a": [document_rows(list(range(4, 40)), 16)], "b": [document_rows([5], 16), document_rows([5, 6], 16)]}
    with caplog.at_level("INFO", logger="megatron_emo.analysis.usage"):
        collect_usage(tiny_qwen2_moe(), documents, progress=True)
    assert [record.getMessage() for record in caplog.records] == ["routing a: 1 documents, 3 rows",
                                                                  "routing b: 1 documents, 1 rows"]
