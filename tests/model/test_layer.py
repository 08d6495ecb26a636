"""EmoTransformerLayer relies on one behaviour of megatron-core's TransformerLayer.forward: the
``padding_mask`` it is given reaches the MLP, recomputed or not. These tests fail the day that
changes."""

import pytest
import torch

from megatron_emo.model.document_batch import DocumentBatch, run_model
from megatron_emo.model.gpt import build_gpt_model
from megatron_emo.model.moe_layer import EmoMoELayer
from megatron_emo.routing.documents import TrainingPools
from tests.conftest import make_config

EOS = 2


@pytest.mark.parametrize("recompute", [False, True])
def test_every_moe_layer_gets_the_micro_batchs_documents(megatron_cpu, recompute):
    overrides = dict(recompute_granularity="selective", recompute_modules=["mlp"]) if recompute else {}
    model = build_gpt_model(make_config(**overrides), max_sequence_length=16, rotary_base=10_000)
    received = []
    for layer in model.modules():
        if isinstance(layer, EmoMoELayer):
            layer.register_forward_pre_hook(lambda module, args, kwargs: received.append(kwargs["padding_mask"]),
                                            with_kwargs=True)
    tokens = torch.randint(3, 64, (2, 16))
    tokens[:, 6] = EOS
    documents = DocumentBatch.of(tokens, EOS, seed=0, step=0, sample_index=torch.arange(2),
                                 pools=TrainingPools.of(model.config))
    run_model(model, tokens, documents, labels=tokens).mean().backward()
    # Recomputing runs each MoE layer again in the backward, with the same documents.
    assert len(received) == 2 * (2 if recompute else 1)
    assert all(item is documents for item in received)


def _saved_activation_bytes(model, tokens, documents) -> int:
    """Bytes of the distinct tensors autograd keeps from ``model``'s forward for its backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run_model(model, tokens, documents, labels=tokens).mean()
    loss.backward()
    return sum(storages.values())


def test_recomputing_the_mlp_keeps_fewer_activations_and_the_same_gradients(megatron_cpu):
    tokens = torch.randint(3, 64, (2, 16))
    documents = DocumentBatch.of(tokens, EOS, seed=0, step=0, sample_index=torch.arange(2),
                                 pools=TrainingPools.of(make_config()))
    saved, grads = {}, {}
    for recompute in (False, True):
        overrides = dict(recompute_granularity="selective", recompute_modules=["mlp"]) if recompute else {}
        torch.manual_seed(0)
        model = build_gpt_model(make_config(**overrides), max_sequence_length=16, rotary_base=10_000)
        saved[recompute] = _saved_activation_bytes(model, tokens, documents)
        grads[recompute] = [param.grad for param in model.parameters()]
    # The MoE layer's inputs are kept either way; its routing, expert rows and SwiGLU are not.
    assert saved[True] < 0.8 * saved[False]
    for plain, recomputed in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(recomputed, plain)
