"""Kernel benchmarks on one CUDA GPU, side by side. ``routing``: the document-pooled router (below);
``grouped_gemm``: the routed experts' SwiGLU FFN; ``moe_layer``: the whole EMO MoE layer (those
two in tools/benchmark_grouped_gemm.py).

    python tools/benchmark_kernels.py routing --output benchmarks/results/DATE_h100_routing.json
    python tools/benchmark_kernels.py grouped_gemm --output benchmarks/results/DATE_h100_grouped_gemm.json
    python tools/benchmark_kernels.py moe_layer --output benchmarks/results/DATE_h100_moe_layer.json

At the EMO shape (B=4, S=4096, ~31 documents per row, E=127 routed experts, top-7, fp32 logits,
training pools uniform on 8..128 as EMO draws them), in one run:
- ``triton``: megatron_emo.kernels.routing.route, the fused kernels;
- ``reference``: the vectorised PyTorch reference (megatron_emo.kernels.routing.reference.route);
- ``plain_topk``: softmax + top-k with no pool, what a standard MoE router costs;
- ``per_document_loop``: a Python loop over rows and documents with host syncs, in the style of
  the original EMO implementation (written here, not part of the package).
Passes: ``fwd``; ``fwd+bwd``, the backward of sum(weights * g) for a fixed random g; and
``fwd+bwd+losses``, which adds the Switch LB loss (on probs) and the z-loss (on logsumexp) as
the router trains. Times are medians in ms: eager (triton.testing.do_bench, host launch overhead
included) and, where a CUDA graph can capture the case, graph replay (do_bench_cudagraph: GPU
time alone). Prints a table of ratios and writes one JSON record per
(implementation, pass) to --output.
"""

import argparse
import datetime
import json
import subprocess
import sys

import torch

from megatron_emo.benchmark.synthetic import cut_into_documents
from megatron_emo.kernels.routing.segments import segment_ordinals
from megatron_emo.logs import add_verbose_argument, configure_cli_logging

EOS = 2


def emo_batch(batch, seq, docs_per_row, num_experts, pool_min, pool_max, seed):
    """Row-major fp32 logits [B*S, E], EOS-delimited documents, and one pool per document.

    Returns:
        dict with ``logits``, ``input_ids`` [B, S] (EOS at each document start after the
        first), ``segment_ids`` [B*S], ``pool_sizes`` [B*S] (segment i's pool at entry i, the
        tail unused, as the routing contract allows) and ``num_segments``.
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 1000, (batch, seq), generator=gen)
    for row in input_ids:
        cut_into_documents(row, docs_per_row, EOS, gen)
    starts = input_ids == EOS
    starts[:, 0] = True  # every row starts a segment; a new one at each later EOS
    segment_ids = segment_ordinals(starts.flatten())
    num_segments = int(segment_ids[-1]) + 1
    pool_sizes = torch.zeros(batch * seq, dtype=torch.int64)
    pool_sizes[:num_segments] = torch.randint(
        pool_min, pool_max + 1, (num_segments,), generator=gen
    )
    logits = torch.randn(batch * seq, num_experts, generator=gen) * 2
    cuda = dict(device="cuda")
    return dict(
        logits=logits.to(**cuda),
        input_ids=input_ids.to(**cuda),
        segment_ids=segment_ids.to(**cuda),
        pool_sizes=pool_sizes.to(**cuda),
        num_segments=num_segments,
    )


def per_document_loop_route(logits, input_ids, pool_sizes, topk):
    """The original implementation's shape: a Python loop over rows (boundaries read to the host
    with .tolist()) and documents (a pool size read with .item(), a softmax and a top-k over the
    summed probabilities, an indexed write into a dense [B, S, E] mask), then one masked
    softmax and top-k for all tokens."""
    batch, seq = input_ids.shape
    num_experts = logits.shape[-1]
    drop = torch.zeros(batch, seq, num_experts, dtype=torch.bool, device=logits.device)
    scores = logits.view(batch, seq, num_experts)
    segment = 0
    for row in range(batch):
        eos = ((input_ids[row, 1:] == EOS).nonzero().flatten() + 1).tolist()
        for start, end in zip([0] + eos, eos + [seq]):
            with torch.no_grad():
                sums = torch.softmax(scores[row, start:end], dim=-1).sum(dim=0)
                num_drop = num_experts - int(pool_sizes[segment].item())
                if num_drop > 0:
                    # As the original: drop the smallest sums (ties: whatever topk returns).
                    drop[row, start:end, torch.topk(-sums, num_drop).indices] = True
            segment += 1
    masked = logits.masked_fill(drop.view(-1, num_experts), float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    weights, indices = torch.topk(probs, topk, dim=-1)
    return weights, indices, probs, torch.logsumexp(masked, dim=-1)


def implementations(data, topk):
    """name -> function(logits) returning (weights, indices, probs, lse)."""
    from megatron_emo.kernels.routing import reference, route

    seg, pools = data["segment_ids"], data["pool_sizes"]

    def plain_topk(logits):
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, topk, dim=-1)
        return weights, indices, probs, torch.logsumexp(logits, dim=-1)

    return {
        "triton": lambda x: route(x, seg, pools, topk, return_logsumexp=True),
        "reference": lambda x: reference.route(x, seg, pools, topk, return_logsumexp=True),
        "plain_topk": plain_topk,
        "per_document_loop": lambda x: per_document_loop_route(x, data["input_ids"], pools, topk),
    }


def make_pass(fn, logits, pass_name, grad_weights):
    """A closure running one pass of ``fn`` on a leaf copy of ``logits``."""
    from megatron_emo.routing.balance import load_balancing_loss, z_loss

    if pass_name == "fwd":
        return lambda: fn(logits)

    def step():
        weights, indices, probs, lse = fn(logits)
        loss = (weights * grad_weights).sum()
        if pass_name == "fwd+bwd+losses":
            # The router's loss weights (EMO's): 0.1 LB and 1e-3 z, here for one layer.
            loss = loss + 0.1 * load_balancing_loss(probs, indices)[0] + 1e-3 * z_loss(lse)
        loss.backward()

    return step


def check_agreement(impls, logits):
    """Max |weights - triton's| per implementation: the comparison must be of equals."""
    with torch.no_grad():
        base = impls["triton"](logits)[0]
        return {
            name: float((fn(logits)[0] - base).abs().max())
            for name, fn in impls.items()
            if name != "plain_topk"
        }


def environment():
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    import triton

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain")) if commit else None
    return dict(
        command=" ".join(sys.argv),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        commit=commit,
        dirty_worktree=dirty,
        date=datetime.date.today().isoformat(),
    )


def time_pass(step, logits, graphable):
    """(eager median ms, CUDA-graph median ms or None) of one pass.

    Eager (do_bench) is what a Python training loop pays, launch overhead included; the graph
    replay (do_bench_cudagraph, no L2 flush) is GPU time alone, what remains once the host runs
    ahead of the GPU, as it does behind a model's large GEMMs.
    """
    import triton.testing

    eager = triton.testing.do_bench(step, grad_to_none=[logits], return_mode="median")
    if not graphable:
        return eager, None
    graph = triton.testing.do_bench_cudagraph(step, grad_to_none=[logits], return_mode="median")
    return eager, graph


def bench_routing(args):
    shape = dict(
        batch=args.batch, seq=args.seq, docs_per_row=args.docs_per_row,
        num_experts=args.num_experts, topk=args.topk, logits_dtype="float32",
        pool_min=args.pool_min, pool_max=args.pool_max,
    )  # fmt: skip
    data = emo_batch(
        args.batch,
        args.seq,
        args.docs_per_row,
        args.num_experts,
        args.pool_min,
        args.pool_max,
        seed=0,
    )
    shape["num_segments"] = data["num_segments"]
    impls = implementations(data, args.topk)
    logits = data["logits"].requires_grad_(True)
    grad_weights = torch.randn(logits.shape[0], args.topk, device="cuda")
    agreement = check_agreement(impls, logits)
    env = environment()
    records = []
    for pass_name in ("fwd", "fwd+bwd", "fwd+bwd+losses"):
        for name, fn in impls.items():
            step = make_pass(fn, logits, pass_name, grad_weights)
            # A CUDA graph cannot capture the loop's host reads, nor the CPU-to-GPU copy of
            # the token count in load_balancing_loss: those cases are timed eagerly only.
            graphable = name != "per_document_loop" and pass_name != "fwd+bwd+losses"
            eager, graph = time_pass(step, logits, graphable)
            records.append(
                dict(
                    benchmark="routing",
                    impl=name,
                    **{"pass": pass_name},
                    eager_ms=eager,
                    graph_ms=graph,
                    shape=shape,
                    **env,
                )
            )
    for record in records:
        same = {r["impl"]: r for r in records if r["pass"] == record["pass"]}
        plain, loop = same["plain_topk"], same["per_document_loop"]
        record["eager_vs_plain_topk"] = record["eager_ms"] / plain["eager_ms"]
        record["graph_vs_plain_topk"] = (
            record["graph_ms"] / plain["graph_ms"] if record["graph_ms"] else None
        )
        record["loop_eager_over_this_eager"] = loop["eager_ms"] / record["eager_ms"]
        record["max_abs_weight_diff_vs_triton"] = agreement.get(record["impl"])
    return records


def print_table(records):
    def fmt(value, spec):
        return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])

    print(
        f"{'pass':<16}{'impl':<19}{'eager ms':>9}{'x plain':>8}{'loop/this':>10}"
        f"{'graph ms':>10}{'x plain':>8}"
    )
    for r in records:
        print(
            f"{r['pass']:<16}{r['impl']:<19}{r['eager_ms']:>9.3f}{r['eager_vs_plain_topk']:>8.2f}"
            f"{r['loop_eager_over_this_eager']:>10.1f}{fmt(r['graph_ms'], '10.4f')}"
            f"{fmt(r['graph_vs_plain_topk'], '8.2f')}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kernel", choices=["routing", "grouped_gemm", "moe_layer"], help="what to benchmark")
    parser.add_argument("--output", required=True, help="JSON file to write (one record per case)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs-per-row", type=int, default=31)
    parser.add_argument("--num-experts", type=int, default=127, help="routed experts")
    parser.add_argument("--topk", type=int, default=7, help="routed top-k")
    parser.add_argument("--pool-min", type=int, default=8)
    parser.add_argument(
        "--pool-max", type=int, default=128, help="EMO: 128 (>= E keeps every expert)"
    )
    parser.add_argument("--rows", type=int, default=131072, help="grouped_gemm: expert rows")
    parser.add_argument("--experts", type=int, default=128, help="grouped_gemm: experts")
    parser.add_argument("--hidden", type=int, default=2048, help="grouped_gemm: model width h")
    parser.add_argument("--ffn", type=int, default=1024, help="grouped_gemm: expert width F")
    parser.add_argument("--loads", nargs="+", default=["uniform", "zipf"],
                        help="grouped_gemm: expert loads (megatron_emo.testing.expert_loads)")  # fmt: skip
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    if not torch.cuda.is_available():
        print("error: benchmark_kernels.py times CUDA kernels and needs a GPU; none is visible "
              "(torch.cuda.is_available() is False)", file=sys.stderr)  # fmt: skip
        return 2
    if args.kernel == "routing":
        records = bench_routing(args)
        print_table(records)
    else:
        import benchmark_grouped_gemm as bench  # tools/, beside this script

        if args.kernel == "grouped_gemm":
            records = bench.bench_grouped_gemm(args, environment())
            bench.print_grouped_gemm(records)
        else:
            records = bench.bench_moe_layer(args, environment())
            bench.print_moe_layer(records)
    with open(args.output, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
