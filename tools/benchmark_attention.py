"""Document-causal core attention on one CUDA GPU, forward+backward, side by side.

    python tools/benchmark_attention.py --output benchmarks/results/DATE_h100_attention.json

At one micro-batch of the EMO shape (B=2, S=4096, 16 heads x 128, bf16, ~30 documents per row):
- ``sdpa_document_mask``: megatron_emo.model.attention.DocumentCausalAttention, SDPA with the
  dense boolean document-causal mask (what the model runs);
- ``flex_block_mask``: FlexAttention with a document-causal block mask built in the call (it
  skips cross-document tiles, but building the mask costs more than it saves at one layer);
- ``sdpa_causal``: SDPA causal over whole rows (flash; ignores documents, so it is wrong for
  EMO — a reference point).
Medians in ms (triton.testing.do_bench); one JSON record per case.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch


def inputs(batch, seq, heads, dim, docs_per_row, seed=0):
    from megatron_emo.routing.documents import segment_ordinals

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (batch, seq), generator=gen)
    ids[torch.rand(batch, seq, generator=gen) < docs_per_row / seq] = 2
    qkv = [torch.randn(seq, batch, heads, dim, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3)]
    return qkv, segment_ordinals(ids, 2).cuda()


def flex_document_attention(q, k, v, docs):
    """FlexAttention with a document-causal block mask built for the call (compiled), as a flex
    path would run per layer without sharing the mask: ``q, k, v [s, b, n, d]`` → ``[b, n, s, d]``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from megatron_emo.model.attention import attention_ids

    ids = attention_ids(docs)

    def document_causal(batch, head, query, kv):
        return (query >= kv) & (ids[batch, query] == ids[batch, kv])

    batch, seq_len = ids.shape
    mask = create_block_mask(document_causal, batch, None, seq_len, seq_len, device=ids.device, _compile=True)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    return torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask)


def cases(docs):
    from megatron_emo.model.attention import DocumentCausalAttention
    from megatron_emo.testing.layouts import tiny_config

    attention = DocumentCausalAttention(tiny_config(), 1, None, "self").cuda()
    return {
        "flex_block_mask": lambda q, k, v: flex_document_attention(q, k, v, docs),
        "sdpa_document_mask": lambda q, k, v: attention(q, k, v, docs),
        "sdpa_causal": lambda q, k, v: attention(q, k, v, None),
    }


def main(argv=None) -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs-per-row", type=int, default=30)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times SDPA, FlexAttention and Triton's do_bench on one)")
    qkv, docs = inputs(args.batch, args.seq, 16, 128, args.docs_per_row)
    records = []
    for name, fn in cases(docs).items():
        def step():
            fn(*qkv).float().square().mean().backward()

        step()  # compile and warm up
        records.append({"case": name, "fwd_bwd_ms": triton.testing.do_bench(step, grad_to_none=qkv, return_mode="median"),
                        "batch": args.batch, "seq": args.seq, "heads": 16, "head_dim": 128,
                        "docs_per_row": args.docs_per_row, "device": torch.cuda.get_device_name(),
                        "torch": torch.__version__, "date": datetime.date.today().isoformat()})
        print(f"{name:20s} {records[-1]['fwd_bwd_ms']:8.2f} ms")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
