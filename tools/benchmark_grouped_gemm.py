"""Benchmarks of the routed-expert path (run through ``tools/benchmark_kernels.py``).

``grouped_gemm``: the whole SwiGLU expert FFN (fc1 [E, h, 2F], SwiGLU, fc2 [E, F, h]) at the EMO
shape (131072 rows = 16384 tokens x top-8, E = 128, h 2048, F 1024, bf16), forward and
forward+backward, under uniform and Zipf-skewed loads, side by side:
- ``triton``: megatron_emo.kernels.grouped_gemm.grouped_swiglu_ffn (SwiGLU in fc1's epilogue);
- ``torch_grouped_mm``: torch._grouped_mm for fc1 and fc2, SwiGLU in between;
- ``per_expert_loop``: the PyTorch reference, a matmul per expert;
- ``dense``: the same FLOPs as one dense FFN (x [rows, h] @ [h, 2F], SwiGLU, @ [F, h]): the
  ceiling a grouped GEMM can approach.
TFLOP/s count 2*rows*K*N per GEMM: 6*rows*h*F forward, three times that forward+backward.
The triton case also times each of its kernels alone (``triton:<stage>``).

``moe_layer``: megatron_emo.model.moe_layer.EmoMoELayer at the EMO shape (B=4, S=4096, ~33
documents per row, 127 routed top-7 + 1 shared expert, d 2048, FFN 1024, bf16, training pools
8..128), forward+backward, side by side:
- ``ours``: the layer as it runs (fused routing, permutation and grouped-GEMM kernels);
- ``torch_grouped_mm``: the same layer with its permutation on the PyTorch reference and its
  routed experts on torch._grouped_mm (this benchmark swaps the two functions the layer calls);
- ``dense_swiglu``: a dense SwiGLU of the same active FLOPs (width 8 x 1024), the ceiling.
Times are medians in ms (triton.testing.do_bench, L2 flushed between runs).
"""

import functools

import torch
import torch.nn.functional as F

ROWS, EXPERTS, HIDDEN, FFN = 131072, 128, 2048, 1024


def _bench(fn, leaves=()):
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=list(leaves), return_mode="median")


def torch_grouped_swiglu_ffn(x, fc1, fc2, group_sizes):
    """The FFN on torch._grouped_mm: group sizes as int32 cumulative offsets on the device."""
    offsets = group_sizes.cumsum(0, dtype=torch.int32)
    gate, up = torch._grouped_mm(x, fc1, offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, fc2, offs=offsets)


def dense_swiglu_ffn(x, fc1, fc2):
    gate, up = (x @ fc1).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2


def _ffn_inputs(load, rows, experts, hidden, ffn):
    from megatron_emo.testing.expert_loads import group_sizes

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16()

    return dict(
        x=randn(rows, hidden),
        fc1=randn(experts, hidden, 2 * ffn, scale=hidden**-0.5),
        fc2=randn(experts, ffn, hidden, scale=ffn**-0.5),
        group_sizes=group_sizes(load, rows, experts).cuda(),
        grad=randn(rows, hidden),
    )


def _ffn_impls(sizes, dense_fc1, dense_fc2):
    """name -> ``fn(x, fc1, fc2)`` on these group sizes; ``dense`` uses its own weights instead."""
    from megatron_emo.kernels.grouped_gemm import grouped_swiglu_ffn, reference

    return {
        "triton": (lambda a, b, c: grouped_swiglu_ffn(a, b, c, sizes)),
        "torch_grouped_mm": (lambda a, b, c: torch_grouped_swiglu_ffn(a, b, c, sizes)),
        "per_expert_loop": (lambda a, b, c: reference.grouped_swiglu_ffn(a, b, c, sizes)),
        "dense": (lambda a, b, c: dense_swiglu_ffn(a, dense_fc1, dense_fc2)),
    }


def _forward_backward(fn, inputs, grad):
    fn(*inputs).backward(grad)


def _kernel_stages(x, fc1, fc2, group_sizes, grad):
    """name -> (closure, FLOPs) for each launch of the triton FFN, forward then backward."""
    from megatron_emo.kernels.grouped_gemm import triton_impl as t

    rows, hidden = x.shape
    ffn = fc2.shape[1]
    gate_up, hidden_act = t.swiglu_rows(x, fc1, group_sizes)
    d_gate_up = t.swiglu_backward_rows(grad, fc2, gate_up, group_sizes)
    gemm = 2 * rows * hidden * ffn  # FLOPs of one [rows, h] x [h, F] product
    return {
        "fc1+swiglu": (lambda: t.swiglu_rows(x, fc1, group_sizes), 2 * gemm),
        "fc2": (lambda: t.grouped_rows(hidden_act, fc2, group_sizes), gemm),
        "fc2 dgrad+swiglu bwd": (
            lambda: t.swiglu_backward_rows(grad, fc2, gate_up, group_sizes), gemm),
        "fc2 wgrad": (lambda: t.grouped_wgrad(hidden_act, grad, group_sizes), gemm),
        "fc1 dgrad": (lambda: t.grouped_rows(d_gate_up, fc1.transpose(1, 2), group_sizes), 2 * gemm),
        "fc1 wgrad": (lambda: t.grouped_wgrad(x, d_gate_up, group_sizes), 2 * gemm),
    }  # fmt: skip


def bench_grouped_gemm(args, env):
    rows, experts, hidden, ffn = args.rows, args.experts, args.hidden, args.ffn
    fwd_flops = 6 * rows * hidden * ffn
    records = []
    for load in args.loads:
        data = _ffn_inputs(load, rows, experts, hidden, ffn)
        x, fc1, fc2, sizes, grad = (data[k] for k in ("x", "fc1", "fc2", "group_sizes", "grad"))
        dense_fc1 = fc1[0].clone().requires_grad_(True)
        dense_fc2 = fc2[0].clone().requires_grad_(True)
        impls = _ffn_impls(sizes, dense_fc1, dense_fc2)
        leaves = [t.clone().requires_grad_(True) for t in (x, fc1, fc2)]
        with torch.no_grad():
            base = impls["torch_grouped_mm"](x, fc1, fc2).float()
            agreement = {
                name: float((fn(x, fc1, fc2).float() - base).abs().max() / base.abs().max())
                for name, fn in impls.items() if name != "dense"
            }  # fmt: skip
        shape = dict(rows=rows, experts=experts, hidden=hidden, ffn=ffn, load=load,
                     max_rows_per_expert=int(sizes.max()), empty_experts=int((sizes == 0).sum()))  # fmt: skip
        for name, fn in impls.items():
            for pass_name in ("fwd", "fwd+bwd"):
                if pass_name == "fwd":
                    with torch.no_grad():
                        ms = _bench(functools.partial(fn, x, fc1, fc2))
                    flops = fwd_flops
                else:
                    params = leaves if name != "dense" else [leaves[0], dense_fc1, dense_fc2]
                    ms = _bench(functools.partial(_forward_backward, fn, leaves, grad), params)
                    flops = 3 * fwd_flops
                records.append(dict(benchmark="grouped_gemm", impl=name, **{"pass": pass_name},
                                    ms=ms, tflops=flops / ms / 1e9, shape=shape,
                                    max_rel_diff_vs_torch_grouped_mm=agreement.get(name), **env))  # fmt: skip
        for stage, (fn, flops) in _kernel_stages(x, fc1, fc2, sizes, grad).items():
            ms = _bench(fn)
            records.append(dict(benchmark="grouped_gemm", impl=f"triton:{stage}", **{"pass": "kernel"},
                                ms=ms, tflops=flops / ms / 1e9, shape=shape, **env))  # fmt: skip
    for record in records:
        same = [r for r in records if r["pass"] == record["pass"] and r["shape"] == record["shape"]]
        ref = {r["impl"]: r["ms"] for r in same}
        if "torch_grouped_mm" in ref:
            record["speedup_vs_torch_grouped_mm"] = ref["torch_grouped_mm"] / record["ms"]
            record["fraction_of_dense"] = ref["dense"] / record["ms"]
    return records


def print_grouped_gemm(records):
    print(f"{'load':<14}{'pass':<9}{'impl':<28}{'ms':>9}{'TFLOP/s':>9}{'x torch':>9}{'/dense':>8}")
    for r in records:
        speedup, dense = r.get("speedup_vs_torch_grouped_mm"), r.get("fraction_of_dense")
        print(f"{r['shape']['load']:<14}{r['pass']:<9}{r['impl']:<28}{r['ms']:>9.3f}"
              f"{r['tflops']:>9.1f}{speedup or 0:>9.2f}{dense or 0:>8.2f}")  # fmt: skip


# ---------------------------------------------------------------- the whole MoE layer


def _emo_layer(batch, seq, docs_per_row):
    from megatron_emo.benchmark.synthetic import cut_into_documents
    from megatron_emo.model.document_batch import DocumentBatch
    from megatron_emo.model.moe_layer import EmoMoELayer
    from megatron_emo.recipes import emo_1b14b
    from megatron_emo.routing.documents import TrainingPools
    from megatron_emo.training.distributed import init_model_parallel, init_process_group

    eos = 2
    config = emo_1b14b().emo_config(vocab_size=100_352, eos_token_id=eos, on_gpu=True)
    init_process_group()
    init_model_parallel(config, seed=0)
    layer = EmoMoELayer(config).cuda()
    layer.set_layer_number(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (batch, seq), generator=gen)
    for row in ids:
        cut_into_documents(row, docs_per_row, eos, gen)
    docs = DocumentBatch.of(ids, eos, seed=0, step=0, sample_index=torch.arange(batch),
                            pools=TrainingPools.of(config)).apply(lambda tensor: tensor.cuda())
    hidden = torch.randn(seq, batch, config.hidden_size, generator=gen).cuda().bfloat16()
    return layer, config, hidden.requires_grad_(True), docs


def bench_moe_layer(args, env):
    from megatron_emo.experts import routed
    from megatron_emo.kernels.permutation import reference as permutation_reference
    from megatron_emo.model import moe_layer

    layer, config, hidden, docs = _emo_layer(args.batch, args.seq, args.docs_per_row)
    grad = torch.randn_like(hidden)
    params = [hidden, *layer.parameters()]

    def layer_step():
        layer(hidden, docs)[0].backward(grad)

    tokens = args.batch * args.seq
    width = config.moe_router_topk * config.moe_ffn_hidden_size
    dense_fc1, dense_fc2 = (
        (torch.randn(shape, device="cuda") * 0.02).bfloat16().requires_grad_(True)
        for shape in ((config.hidden_size, 2 * width), (width, config.hidden_size))
    )
    x_dense = hidden.detach().view(tokens, -1).requires_grad_(True)

    def dense_step():
        dense_swiglu_ffn(x_dense, dense_fc1, dense_fc2).backward(grad.view(tokens, -1))

    results = {"ours": _bench(layer_step, params)}
    # The baseline: the same layer on the PyTorch permutation and torch._grouped_mm.
    saved = (moe_layer.permute, moe_layer.unpermute, routed.grouped_swiglu_ffn)
    moe_layer.permute, moe_layer.unpermute = permutation_reference.permute, permutation_reference.unpermute
    routed.grouped_swiglu_ffn = torch_grouped_swiglu_ffn
    try:
        results["torch_grouped_mm"] = _bench(layer_step, params)
    finally:
        moe_layer.permute, moe_layer.unpermute, routed.grouped_swiglu_ffn = saved
    results["dense_swiglu"] = _bench(dense_step, [x_dense, dense_fc1, dense_fc2])
    active_flops = 3 * 6 * tokens * config.hidden_size * width  # experts only, fwd+bwd
    shape = dict(batch=args.batch, seq=args.seq, docs_per_row=args.docs_per_row,
                 routed_experts=config.num_routed_experts, topk=config.moe_router_topk,
                 hidden=config.hidden_size, ffn=config.moe_ffn_hidden_size)  # fmt: skip
    return [
        dict(benchmark="moe_layer", impl=name, **{"pass": "fwd+bwd"}, ms=ms,
             expert_tflops=active_flops / ms / 1e9, vs_torch_grouped_mm=results["torch_grouped_mm"] / ms,
             shape=shape, **env)
        for name, ms in results.items()
    ]  # fmt: skip


def print_moe_layer(records):
    print(f"{'impl':<20}{'ms':>9}{'expert TF/s':>13}{'x torch':>9}")
    for r in records:
        print(f"{r['impl']:<20}{r['ms']:>9.2f}{r['expert_tflops']:>13.1f}{r['vs_torch_grouped_mm']:>9.2f}")
