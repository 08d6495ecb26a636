"""Helpers of the conversion tests: run a megatron_emo model as the HF model runs."""

import torch

from megatron_emo.model.document_batch import DocumentBatch, run_model
from megatron_emo.routing.documents import TrainingPools


def our_logits(model, tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """fp32 logits ``[b, s, V]`` of our GPTModel, called as in training (document ids derived
    from the tokens; with no EOS in ``tokens`` attention is plain causal, as HF's)."""
    documents = DocumentBatch.of(tokens, eos_token_id, seed=0, step=0, sample_index=torch.arange(tokens.shape[0]),
                                 pools=TrainingPools.of(model.config))
    with torch.no_grad():
        return run_model(model, tokens, documents).float()


def our_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int,
               suppress: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation without KV cache: recompute the whole prefix for every token."""
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        logits = our_logits(model, torch.tensor([ids]), eos_token_id)[0, -1]
        if suppress:
            logits[list(suppress)] = -float("inf")
        token = int(logits.argmax())
        new.append(token)
        if token == eos_token_id:
            break
        ids.append(token)
    return new


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own generate() (KV cache), settings from the folder's generation_config."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()
