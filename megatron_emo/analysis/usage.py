"""Router statistics of an exported (Qwen2-MoE) model over text grouped by domain and document.

For every layer ``l``, domain ``d`` and routed expert ``e``:

- ``selections[l, d, e]``: how many of the domain's tokens have ``e`` among their routed top-k,
  i.e. run it; a row sums to top-k × the domain's tokens;
- ``probability[l, d, e]``: the router probability mass (softmax over all routed experts) summed
  over the domain's tokens; a row sums to the tokens;

and per document, the number of distinct routed experts its tokens select in each layer.

The HF model routes with no document pool (as EMO's released models and tools/evaluate.py), so
an EMO model and a standard MoE are measured alike: what is seen is what training taught the
router, not the pool's restriction. The shared expert runs for every token and is not counted.
"""

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from megatron_emo.kernels.permutation import tokens_per_expert

logger = logging.getLogger(__name__)


@dataclass
class ExpertUsage:
    domains: list[str]
    top_k: int
    """Routed experts each token selects."""
    selections: torch.Tensor
    """``[L, D, E]`` float64: top-k selections per layer, domain and routed expert."""
    probability: torch.Tensor
    """``[L, D, E]`` float64: summed router probabilities."""
    tokens: torch.Tensor
    """``[D]`` int64: routed tokens per domain."""
    distinct: list[torch.Tensor]
    """Per domain, ``[num_documents, L]`` int64: distinct experts each document selects."""

    @property
    def num_layers(self) -> int:
        return self.selections.shape[0]

    @property
    def num_experts(self) -> int:
        return self.selections.shape[2]


class UsageAccumulator:
    """Adds up router logits document by document (see the module docs for what is counted)."""

    def __init__(self, domains: Sequence[str], *, num_layers: int, num_experts: int, top_k: int):
        self.domains, self.top_k = list(domains), top_k
        shape = (num_layers, len(self.domains), num_experts)
        # On the CPU whatever the default device (callers may run under ``torch.device("cuda")``).
        self.selections = torch.zeros(shape, dtype=torch.float64, device="cpu")
        self.probability = torch.zeros(shape, dtype=torch.float64, device="cpu")
        self.tokens = torch.zeros(len(self.domains), dtype=torch.int64, device="cpu")
        self.distinct: list[list[torch.Tensor]] = [[] for _ in self.domains]

    def add_document(self, domain: str, router_logits: Sequence[torch.Tensor]) -> None:
        """``router_logits``: one ``[T, E]`` tensor per layer, all of one document's tokens."""
        d = self.domains.index(domain)
        distinct = []
        for layer, logits in enumerate(router_logits):
            probs = torch.softmax(logits.detach().double().cpu(), dim=-1)
            top = torch.topk(probs, self.top_k, dim=-1).indices  # as the HF gate: top-k of the softmax
            counts = tokens_per_expert(top, probs.shape[-1]).double()
            self.selections[layer, d] += counts
            self.probability[layer, d] += probs.sum(0)
            distinct.append(int((counts > 0).sum()))
        self.tokens[d] += router_logits[0].shape[0]
        self.distinct[d].append(torch.tensor(distinct, device="cpu"))

    def result(self) -> ExpertUsage:
        distinct = [
            torch.stack(docs) if docs else torch.zeros(0, self.selections.shape[0], dtype=torch.int64, device="cpu")
            for docs in self.distinct
        ]
        return ExpertUsage(self.domains, self.top_k, self.selections, self.probability, self.tokens, distinct)


def document_rows(token_ids: Sequence[int], seq_length: int) -> list[torch.Tensor]:
    """One document as ``[1, <= seq_length]`` rows (the HF model attends across EOS, so rows
    never mix documents); a last piece of one token is dropped, as tools/evaluate.py does."""
    return [torch.tensor([token_ids[start:start + seq_length]])
            for start in range(0, len(token_ids) - 1, seq_length)]


@torch.no_grad()
def collect_usage(model, documents: dict[str, list[list[torch.Tensor]]], *, progress: bool = False) -> ExpertUsage:
    """Router statistics of a stock ``Qwen2MoeForCausalLM`` over ``{domain: [document rows]}``
    (rows as :func:`document_rows` makes them, on any device). Logs a line per domain, and with
    ``progress`` shows a bar over its documents."""
    config = model.config
    accumulator = UsageAccumulator(documents, num_layers=config.num_hidden_layers, num_experts=config.num_experts,
                                   top_k=config.num_experts_per_tok)
    device = next(model.parameters()).device
    for domain, docs in documents.items():
        docs = list(filter(None, docs))  # a document of one token has nothing to predict
        logger.info("routing %s: %d documents, %d rows", domain, len(docs), sum(map(len, docs)))
        for rows in tqdm(docs, desc=domain, unit="doc", leave=False, disable=not progress):
            per_row = [model(input_ids=row.to(device), output_router_logits=True).router_logits for row in rows]
            accumulator.add_document(domain, [torch.cat(layer) for layer in zip(*per_row)])
    return accumulator.result()
