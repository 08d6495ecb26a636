import torch

from megatron_emo.model.document_batch import DocumentBatch, run_model
from megatron_emo.model.gpt import build_gpt_model
from megatron_emo.routing.documents import TrainingPools
from megatron_emo.routing.router import DocumentPooledRouter
from tests.conftest import make_config as model_config

EOS = 2


def _model(**overrides):
    return build_gpt_model(model_config(**overrides), max_sequence_length=32, rotary_base=10_000)


def _forward(model, tokens, sample_index, step=0):
    documents = DocumentBatch.of(tokens, EOS, seed=7, step=step, sample_index=sample_index,
                                 pools=TrainingPools.of(model.config))
    return run_model(model, tokens, documents, labels=torch.roll(tokens, -1, dims=1))


def _tokens(batch, seq):
    tokens = torch.randint(4, 64, (batch, seq))
    tokens[:, 5::7] = EOS
    return tokens


def test_train_step_reaches_every_router(megatron_cpu):
    model = _model()
    model.train()
    loss = _forward(model, _tokens(2, 24), torch.arange(2))
    assert loss.shape == (2, 24) and torch.isfinite(loss).all()
    loss.mean().backward()
    routers = [m for m in model.modules() if isinstance(m, DocumentPooledRouter)]
    assert len(routers) == 2
    for router in routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
        stats = router.metrics.read()
        # Pools of 3..8 of the 8 routed experts: on average fewer than all of them.
        assert 3 <= stats["pool_experts"] < 8


def test_topk_mode_uses_every_expert(megatron_cpu):
    model = _model(emo_router_mode="topk")
    model.train()
    _forward(model, _tokens(2, 24), torch.arange(2)).mean().backward()
    for router in (m for m in model.modules() if isinstance(m, DocumentPooledRouter)):
        assert router.metrics.read()["pool_experts"] == 8


def test_loss_is_layout_invariant(megatron_cpu):
    # The same samples give the same per-token losses whether they come in one batch or as a
    # data-parallel slice: pools hash the sample's global index, not its row in the micro-batch.
    model = _model()
    model.train()
    tokens = _tokens(4, 24)
    whole = _forward(model, tokens, torch.arange(4), step=5)
    part = _forward(model, tokens[2:], torch.tensor([2, 3]), step=5)
    torch.testing.assert_close(part, whole[2:], rtol=1e-5, atol=1e-5)
    # Another step draws other pools, so the losses move.
    assert not torch.allclose(_forward(model, tokens, torch.arange(4), step=6), whole)


def test_documents_do_not_see_each_other(megatron_cpu):
    # With no pool (eval, emo_eval_pool=None) a document's outputs depend on its own tokens only.
    model = _model(emo_eval_pool=None).eval()
    second = torch.randint(4, 64, (8,))
    row_a = torch.cat([torch.randint(4, 64, (5,)), torch.tensor([EOS]), second])
    row_b = torch.cat([torch.randint(4, 64, (5,)), torch.tensor([EOS]), second])
    with torch.no_grad():
        losses = _forward(model, torch.stack([row_a, row_b]), torch.arange(2))
    # (the last label wraps around to the row start, so it differs)
    torch.testing.assert_close(losses[0, 6:-1], losses[1, 6:-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(losses[0, :5], losses[1, :5])

