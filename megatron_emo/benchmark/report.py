"""The benchmark's comparison: ratios to ``emo``, the targets, a console table and a bar chart."""

from megatron_emo.benchmark.timeline import COMPONENTS

TARGETS = (
    # (name, case, measure, at least, what it shows)
    ("emo / topk tokens/s", "topk", "tokens", 0.97, "EMO routing nearly free"),
    ("emo / mcore-moe tokens/s", "mcore-moe", "tokens", 3.0, "ahead of megatron-core's MoE"),
    ("loop-router / emo router ms", "loop-router", "router", 20.0, "the fused router against the loop"),
    ("emo / loop-router tokens/s", "loop-router", "tokens", 1.3, "end to end against the loop"),
    ("emo / dense tokens/s", "dense", "tokens", 0.85, "close to the dense ceiling"),
)
MFU_TARGET = 0.40
EXPLAINED_TARGET = 0.90
OPTIMIZER_TARGET = 1 / 1.5
"""The optimizer step within 1.5x the time its bytes take at the measured copy bandwidth."""
HEADERS = {"embedding": "embed", "attention": "attn", "shared_expert": "shared", "optimizer": "optim"}
"""Table headers of the components whose names are too wide for a column."""


def _ok(records: list[dict]) -> dict[str, dict]:
    return {r["case"]: r for r in records if r["status"] == "ok"}


def add_ratios(records: list[dict]) -> None:
    """Per case: its tokens/s and router time against ``emo`` (``vs_emo``), in place."""
    emo = _ok(records).get("emo")
    if emo is None:
        return
    for record in _ok(records).values():
        ratios = {"tokens_per_s": record["tokens_per_s_per_gpu"] / emo["tokens_per_s_per_gpu"]}
        router, emo_router = (r.get("breakdown_ms", {}).get("router") for r in (record, emo))
        if router and emo_router:
            ratios["router_ms"] = router / emo_router
        record["vs_emo"] = ratios


def targets(records: list[dict]) -> list[dict]:
    """Every target with its measured value (None where a case is missing or failed)."""
    cases = _ok(records)
    emo = cases.get("emo")
    results = []
    for name, case, measure, minimum, meaning in TARGETS:
        value = None
        if emo is not None and case in cases:
            ratios = cases[case].get("vs_emo", {})
            value = 1 / ratios["tokens_per_s"] if measure == "tokens" else ratios.get("router_ms")
        results.append(dict(target=name, at_least=minimum, value=value, met=None if value is None else value >= minimum,
                            meaning=meaning))
    mfu = emo.get("mfu") if emo else None
    results.append(dict(target="emo MFU", at_least=MFU_TARGET, value=mfu,
                        met=None if mfu is None else mfu >= MFU_TARGET,
                        meaning="honest model FLOPs over the GPU's bf16 peak"))
    explained = None
    if emo and emo.get("breakdown_step_ms"):
        explained = 1 - emo["breakdown_ms"]["other"] / emo["breakdown_step_ms"]
    results.append(dict(target="emo step share outside other", at_least=EXPLAINED_TARGET, value=explained,
                        met=None if explained is None else explained >= EXPLAINED_TARGET,
                        meaning="the profile names where the step goes (other <= 10%)"))
    optimizer = None
    if emo and emo.get("optimizer_memory_bound_ms") and emo.get("breakdown_ms"):
        optimizer = emo["optimizer_memory_bound_ms"] / emo["breakdown_ms"]["optimizer"]
    results.append(dict(target="emo optimizer memory-bound / measured ms", at_least=OPTIMIZER_TARGET, value=optimizer,
                        met=None if optimizer is None else optimizer >= OPTIMIZER_TARGET,
                        meaning="the optimizer step within 1.5x its bytes at the copy bandwidth"))
    return results


IDLE_SITES_SHOWN = 8
"""Idle-time sites printed per case (the JSON keeps more)."""


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    """Two tables, a line per case in each: throughput, MFU, memory, ratio to emo and the median
    timed step; then ms per instrumented step: its total, the GPU's idle time within it (not a
    component: idle gaps lie inside the components' times), the host's waits for the GPU in
    that step and the breakdown; then, where the host was traced, where the idle time comes from."""
    speed = [f"{'case':<12}{'tok/s/GPU':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}{'x emo':>7}{'step ms':>9}"]
    split = [f"{'case':<12}{'step':>9}{'GPU idle':>9}{'syncs':>7}"
             + "".join(f"{HEADERS.get(name, name):>9}" for name in COMPONENTS)]
    for r in records:
        if r["status"] != "ok":
            speed.append(f"{r['case']:<12}{r['status']}: {r['error']}")
            continue
        speed.append(
            f"{r['case']:<12}{r['tokens_per_s_per_gpu']:>11.0f}{r['tflops_per_gpu']:>9.1f}"
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f'):>7}{_fmt(r.get('peak_memory_gib'), '.1f'):>9}"
            f"{_fmt(r.get('vs_emo', {}).get('tokens_per_s'), '.2f'):>7}{1e3 * r['step_time_median_s']:>9.1f}"
        )
        breakdown = r.get("breakdown_ms", {})
        split.append(
            f"{r['case']:<12}{_fmt(r.get('breakdown_step_ms'), '.1f'):>9}{_fmt(r.get('gpu_idle_ms'), '.1f'):>9}"
            f"{_fmt(r.get('host_syncs'), 'd'):>7}"
            + "".join(f"{_fmt(breakdown.get(name), '.1f'):>9}" for name in COMPONENTS)
        )
    heading = ("ms per instrumented step: its total, the GPU's idle time within it (not a component), the host's "
               "waits for the GPU, by component")
    sites = []
    for r in records:
        for site in r.get("gpu_idle_by_launch_site", [])[:IDLE_SITES_SHOWN]:
            sites.append(f"{r['case']:<12}{site['idle_ms']:>9.1f}{site['gaps']:>7}  {site['site']}")
    if sites:
        sites.insert(0, f"\nGPU idle by the host code that launched the work after each gap (top {IDLE_SITES_SHOWN}):\n"
                        f"{'case':<12}{'ms':>9}{'gaps':>7}  site")
    return "\n".join(speed + ["", heading] + split + sites)


def draw_chart(records: list[dict], path, title: str) -> None:
    """PNG: tokens/s/GPU per case, and each case's step time split by component, with the
    GPU's idle time within it written above (where measured)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    ok = [r for r in records if r["status"] == "ok"]
    names = [r["case"] for r in ok]
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    speed, split = figure.subplots(1, 2)
    bars = speed.bar(names, [r["tokens_per_s_per_gpu"] for r in ok], color="tab:blue")
    speed.bar_label(bars, labels=[f"{r['tokens_per_s_per_gpu']:.0f}" + (f"\n{100 * r['mfu']:.0f}% MFU" if r["mfu"]
                                  else "") for r in ok], fontsize=8)
    speed.set_ylabel("tokens/s per GPU")
    speed.set_title("throughput")
    bottom = [0.0] * len(ok)
    # One colour per component (the default cycle has 10): tab20's dark shades, then its light.
    colors = colormaps["tab20"].colors[::2] + colormaps["tab20"].colors[1::2]
    for name, color in zip(COMPONENTS, colors):
        heights = [r.get("breakdown_ms", {}).get(name, 0.0) for r in ok]
        top = split.bar(names, heights, bottom=bottom, label=name, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    split.bar_label(top, labels=[f"GPU idle {r['gpu_idle_ms']:.0f} ms" if "gpu_idle_ms" in r else "" for r in ok],
                    fontsize=7)
    split.set_ylabel("ms per step (instrumented steps)")
    split.set_title("where a step's time goes")
    split.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=120)
