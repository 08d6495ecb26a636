"""Document-causal core attention on one CUDA GPU, forward+backward, side by side.

    python tools/benchmark_attention.py --output benchmarks/results/DATE_h100_attention.json

At one micro-batch of the EMO shape (B=2, S=4096, 16 heads x 128, bf16, ~30 documents per row):
- ``varlen_document``: megatron_emo.kernels.attention.document_attention, PyTorch's varlen flash
  kernel over the documents (the model's GPU path), with the boundaries built in the call from
  the token ids (megatron_emo.model.document_batch.attention_boundaries, exact longest document);
- ``varlen_document_rowmax``: the same with the row length as max_seqlen (no reduction for the
  longest document; the kernel launches work for all S positions of every document);
- ``sdpa_document_mask``: the PyTorch reference of document_attention, SDPA with the dense
  boolean document-causal mask built in the call (the model's CPU path, and what its GPU path
  was before the flash kernel);
- ``flex_block_mask``: FlexAttention with a document-causal block mask built in the call (it
  skips cross-document tiles, but building the mask costs more than it saves at one layer);
- ``sdpa_causal``: SDPA causal over whole rows (flash; ignores documents, so it is wrong for
  EMO — a reference point).
Medians in ms (triton.testing.do_bench); one JSON record per case. ``fwd_bwd_ms`` includes what
each case builds per call (mask or boundaries). The varlen records add ``build_ms`` (the
boundaries from CUDA token ids alone, one host sync included), ``build_cpu_ms`` (from the CPU
token ids, as the data loader holds them: no device sync), ``attention_fwd_bwd_ms`` (with the
boundaries built once beforehand: what every further layer of the micro-batch costs) and
``max_seqlen``.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from megatron_emo.logs import add_verbose_argument, configure_cli_logging

EOS = 2


def inputs(batch, seq, heads, dim, docs_per_row, seed=0):
    """``q, k, v [s, b, n, d]`` bf16 leaves on the GPU, and CPU token ids ``[b, s]``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (batch, seq), generator=gen)
    ids[torch.rand(batch, seq, generator=gen) < docs_per_row / seq] = EOS
    qkv = [torch.randn(seq, batch, heads, dim, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3)]
    return qkv, ids


def flex_document_attention(q, k, v, ids):
    """FlexAttention with a document-causal block mask built for the call (compiled), as a flex
    path would run per layer without sharing the mask: ``q, k, v [s, b, n, d]``, ``ids [b, s]``
    the attention document of every token → ``[b, n, s, d]``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def document_causal(batch, head, query, kv):
        return (query >= kv) & (ids[batch, query] == ids[batch, kv])

    batch, seq_len = ids.shape
    mask = create_block_mask(document_causal, batch, None, seq_len, seq_len, device=ids.device, _compile=True)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    return torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask)


def varlen_document_attention(q, k, v, ids, exact_max):
    """document_attention with the boundaries built from the token ids ``[b, s]`` in the call."""
    from megatron_emo.kernels.attention import document_attention
    from megatron_emo.model.document_batch import attention_boundaries

    return document_attention(q, k, v, *attention_boundaries(ids, EOS, exact_max=exact_max))


def cases(ids):
    """name → ``fn(q, k, v)``, each building what it needs from the GPU token ids ``[b, s]``."""
    from megatron_emo.kernels.attention import reference
    from megatron_emo.model.attention import DocumentCausalAttention
    from megatron_emo.model.document_batch import attention_boundaries
    from megatron_emo.testing.layouts import tiny_config

    attention = DocumentCausalAttention(tiny_config(), 1, None, "self").cuda()
    cu_seqlens, longest = attention_boundaries(ids, EOS)
    document = reference.document_index(cu_seqlens, *ids.shape)
    return {
        "varlen_document": lambda q, k, v: varlen_document_attention(q, k, v, ids, exact_max=True),
        "varlen_document_rowmax": lambda q, k, v: varlen_document_attention(q, k, v, ids, exact_max=False),
        "flex_block_mask": lambda q, k, v: flex_document_attention(q, k, v, document),
        "sdpa_document_mask": lambda q, k, v: reference.document_attention(q, k, v, cu_seqlens, longest),
        "sdpa_causal": lambda q, k, v: attention(q, k, v, None),
    }


def cpu_ms(fn, repeats=50):
    """Median wall time of ``fn()`` on the host, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def varlen_extras(qkv, ids_cpu, ids, exact_max, bench):
    """The boundaries' build times, and forward+backward with the boundaries built beforehand."""
    from megatron_emo.kernels.attention import document_attention
    from megatron_emo.model.document_batch import attention_boundaries

    cu_seqlens, max_seqlen = attention_boundaries(ids, EOS, exact_max=exact_max)

    def step():
        document_attention(*qkv, cu_seqlens, max_seqlen).float().square().mean().backward()

    return {
        "build_ms": bench(lambda: attention_boundaries(ids, EOS, exact_max=exact_max)),
        "build_cpu_ms": cpu_ms(lambda: attention_boundaries(ids_cpu, EOS, exact_max=exact_max)),
        "attention_fwd_bwd_ms": bench(step),
        "max_seqlen": max_seqlen,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs-per-row", type=int, default=30)
    parser.add_argument("--output", type=Path, required=True)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times flash, SDPA and FlexAttention kernels with Triton's do_bench)")
    import triton.testing

    qkv, ids_cpu = inputs(args.batch, args.seq, 16, 128, args.docs_per_row)
    ids = ids_cpu.cuda()

    def bench(fn):
        return triton.testing.do_bench(fn, grad_to_none=qkv, return_mode="median")

    records = []
    for name, fn in cases(ids).items():
        def step(fn=fn):
            fn(*qkv).float().square().mean().backward()

        step()  # compile and warm up
        record = {"case": name, "fwd_bwd_ms": bench(step)}
        if name.startswith("varlen_"):
            record.update(varlen_extras(qkv, ids_cpu, ids, name == "varlen_document", bench))
        records.append({**record, "batch": args.batch, "seq": args.seq, "heads": 16, "head_dim": 128,
                        "docs_per_row": args.docs_per_row, "device": torch.cuda.get_device_name(),
                        "torch": torch.__version__, "date": datetime.date.today().isoformat()})
        extras = "".join(f"  {key} {record[key]:.3f}" for key in ("build_ms", "build_cpu_ms", "attention_fwd_bwd_ms")
                         if key in record)
        print(f"{name:24s} {record['fwd_bwd_ms']:8.3f} ms{extras}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
