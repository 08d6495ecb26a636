"""Where a training step's time goes, by component, from marks at module boundaries.

Marks are taken when a component's forward starts and ends (forward hooks), when its backward
starts and ends (full backward hooks, or gradient hooks where those do not fit), and around the
optimizer step: CUDA events on the GPU (GPU time between launches, idle gaps included), the host
clock on the CPU (where every op is synchronous). The time between two consecutive marks belongs
to the innermost component open at the first of them. The components:

- ``embedding``: GPTModel's embedding, forward, and backward until its weight's gradient is
  accumulated (into megatron-core DDP's ``main_grad`` on the GPU; with tied embeddings, the one
  accumulation of both gradients): token ids need no gradient, so none marks its end;
- ``rotary``: GPTModel's rotary table (megatron-core caches it: little after the first step);
  applying it is attention's;
- ``attention``: each layer's self-attention;
- ``norms``: every RMSNorm, each layer's two and the final one, forward and backward;
- ``router``, ``experts`` (a dense model's MLP too), ``shared_expert``; inside an MoE layer but
  outside those, ``dispatch`` before the routed experts run and ``combine`` after them in the
  forward, the reverse in the backward (the combine's gradient comes first);
- ``lm_head``: the output layer's forward matmul and both backward ones, from the logits'
  gradient to its input's gradient (see :func:`_lm_head_hooks`);
- ``loss``: from the LM head's output to the logits' gradient: the cross-entropy, the loss's
  reduction and scaling, and their backward (and on a pipeline's last stage whatever it does
  between a micro-batch's forward and backward);
- ``optimizer``: the optimizer step;
- ``other``: the rest: residual adds, data, the schedule's host work, gradient bookkeeping
  (finalisation and reductions).

The hooks add a little work, so the breakdown comes from steps of their own, after the timed
ones. Idle GPU time lies inside those components' intervals (a launch gap belongs to whatever
the host was running), so it is measured apart, from one more step under torch.profiler
(:func:`gpu_time`).
"""

import contextlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_emo.model.norm import RMSNorm
from megatron_emo.parallel.shards import chunks_of

COMPONENTS = ("embedding", "rotary", "attention", "norms", "router", "dispatch", "experts", "shared_expert",
              "combine", "lm_head", "loss", "optimizer", "other")
"""Reported components, in the order a step reaches them."""

MOE = "moe"
"""Label of an MoE layer: a container whose own time is dispatch or combine."""

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
"""Categories of the GPU's own work in a profiler trace (not runtime calls, syncs, annotations)."""


def component_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """(label, module) of every timed module of ``model`` (a module or a list of pipeline
    chunks): the embedding and rotary table; per layer its attention, and its MoE layer with
    router, routed experts and shared experts (or its dense MLP); every RMSNorm; the LM head."""
    found = []
    for module in (module for chunk in chunks_of(model) for module in chunk.modules()):
        if isinstance(module, TransformerLayer):
            found.append(("attention", module.self_attention))
            mlp = module.mlp
            if hasattr(mlp, "router"):
                found += [(MOE, mlp), ("router", mlp.router), ("experts", mlp.experts)]
                if getattr(mlp, "shared_experts", None) is not None:
                    found.append(("shared_expert", mlp.shared_experts))
            else:
                found.append(("experts", mlp))
        elif isinstance(module, RMSNorm):
            found.append(("norms", module))
        elif isinstance(module, GPTModel):
            if module.pre_process:
                found.append(("embedding", module.embedding))
            if getattr(module, "rotary_pos_emb", None) is not None:
                found.append(("rotary", module.rotary_pos_emb))
            if module.post_process:
                found.append(("lm_head", module.output_layer))
    return found


class Timeline:
    """Marks of the instrumented steps and their attribution to components."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.marks = []  # (clock, label of the interval starting here); None ends a step
        self.spans = []  # (first clock, last clock) of each step
        self.open = []  # innermost last: [label, routed experts done (MoE layers only)]
        self.backward = False

    def _clock(self):
        if not self.on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _mark(self, label) -> None:
        self.marks.append((self._clock(), label))

    def _milliseconds(self, start, end) -> float:
        return start.elapsed_time(end) if self.on_gpu else (end - start) * 1e3

    def current(self) -> str:
        if not self.open:
            return "other"
        label, experts_done = self.open[-1]
        if label != MOE:
            return label
        return "combine" if experts_done != self.backward else "dispatch"

    def enter(self, label: str, *, backward: bool) -> None:
        self.backward = backward
        self.open.append([label, False])
        self._mark(self.current())

    def exit(self, label: str) -> None:
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0] == label:
                del self.open[i]
                break
        if label == "experts" and self.open and self.open[-1][0] == MOE:
            self.open[-1][1] = True
        self._mark(self.current())

    @contextlib.contextmanager
    def span(self, label: str):
        self.enter(label, backward=False)
        try:
            yield
        finally:
            self.exit(label)

    @contextlib.contextmanager
    def step(self):
        """One instrumented training step."""
        self.open.clear()
        self._mark("other")
        first = self.marks[-1][0]
        try:
            yield
        finally:
            self._mark(None)
            self.spans.append((first, self.marks[-1][0]))

    def milliseconds_per_step(self) -> dict[str, float]:
        """Mean time per instrumented step of every component, in ms."""
        if self.on_gpu:
            torch.cuda.synchronize()
        totals = dict.fromkeys(COMPONENTS, 0.0)
        for (start, label), (end, _) in zip(self.marks, self.marks[1:]):
            if label is not None:  # None: between steps
                totals[label] += self._milliseconds(start, end)
        return {name: value / max(len(self.spans), 1) for name, value in totals.items()}

    def step_milliseconds(self) -> float:
        """Mean length of an instrumented step from its first mark to its last, in ms: what the
        components add up to."""
        if self.on_gpu:
            torch.cuda.synchronize()
        return sum(self._milliseconds(*span) for span in self.spans) / max(len(self.spans), 1)


def _module_hooks(module: torch.nn.Module, label: str, timeline: Timeline,
                  weight: torch.nn.Parameter | None = None) -> list:
    """Marks from forward hooks and full backward hooks: the backward ends once the gradients of
    all the module's inputs are done or, given ``weight``, once that weight's gradient is
    accumulated (for a module whose inputs need no gradient, whose full backward hook fires
    before its backward runs)."""
    handles = [
        module.register_forward_pre_hook(lambda m, args: timeline.enter(label, backward=False)),
        module.register_forward_hook(lambda m, args, out: timeline.exit(label)),
        module.register_full_backward_pre_hook(lambda m, grad: timeline.enter(label, backward=True)),
    ]
    if weight is None:
        handles.append(module.register_full_backward_hook(lambda m, grad_in, grad_out: timeline.exit(label)))
    else:
        handles.append(_AccumulationHook(weight, lambda: timeline.exit(label)))
    return handles


class _AccumulationHook:
    """Calls ``hook`` once ``param``'s gradient is accumulated, from a hook on its accumulator
    node. megatron-core's DDP hooks the same node, earlier, to add the gradient into
    ``main_grad``, so this runs after that. The node is held while hooked: autograd keeps
    only a weak reference and would rebuild it, unhooked, at a later forward."""

    def __init__(self, param: torch.nn.Parameter, hook: Callable[[], None]):
        self.node = param.expand_as(param).grad_fn.next_functions[0][0]
        self.handle = self.node.register_hook(lambda grad_inputs, grad_outputs: hook())

    def remove(self) -> None:
        self.handle.remove()


def _lm_head_hooks(module: torch.nn.Module, timeline: Timeline) -> list:
    """Marks of the LM head and the loss from forward hooks and gradient hooks on the logits and
    the LM head's input (megatron-core's cross-entropy modifies the logits in place, which full
    backward hooks refuse). The logits' gradient ends ``loss`` and starts the LM head's
    backward; its input's gradient ends it. Both backward matmuls lie between: megatron-core's
    linear computes the input's and the weight's gradient in one autograd node, and autograd
    accumulates the weight's gradient (megatron-core's DDP hook, which adds it into
    ``main_grad``, included) before it runs the node that the input's gradient hook precedes.
    With tied embeddings that accumulation waits for the embedding's gradient, and is the
    embedding's."""

    def before(m, args):
        timeline.enter("lm_head", backward=False)
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: timeline.exit("lm_head"))

    def after(m, args, output):
        timeline.exit("lm_head")
        logits = output[0] if isinstance(output, tuple) else output
        if logits.requires_grad:
            timeline.enter("loss", backward=False)
            logits.register_hook(logits_gradient)

    def logits_gradient(grad):
        timeline.exit("loss")
        timeline.enter("lm_head", backward=True)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


@contextlib.contextmanager
def instrument(model, timeline: Timeline):
    """Hooks on the components of ``model`` that mark ``timeline``, removed on exit."""
    handles = []
    for label, module in component_modules(model):
        if label == "lm_head":
            handles += _lm_head_hooks(module, timeline)
        elif label == "embedding":
            handles += _module_hooks(module, label, timeline, weight=module.word_embeddings.weight)
        else:
            handles += _module_hooks(module, label, timeline)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``, (start, end) pairs."""
    length, reached = 0.0, -math.inf
    for first, last in sorted(intervals):
        first = max(first, reached)
        if last > first:
            length += last - first
            reached = last
    return length


def gpu_time(run_step: Callable[[], None], *, trace_host: bool = False) -> dict:
    """The GPU's busy and idle time in ``run_step`` (one step), from a torch.profiler trace of
    the GPU's activity (see :func:`busy_and_idle`).

    The step's span on the GPU runs from a marker kernel launched as the step starts, with
    nothing queued before it, to one launched once the step has returned and its work is done:
    the step's wall time as the host sees it. By default the host's ops are not traced: that
    would slow them, and the GPU would wait for them more than in unprofiled steps. Tracing the
    GPU's activity still slows each launch a little, so where the host is the bottleneck the idle
    time reads somewhat high: ``gpu_busy_ms + gpu_idle_ms`` against the instrumented steps'
    ``breakdown_step_ms`` shows by how much.

    Also counts the step's host synchronisations (:func:`host_syncs`): ``host_syncs`` and
    ``host_syncs_by_line``.

    ``trace_host`` also traces the host's ops and Python calls, to tell where the idle time
    comes from (:func:`idle_by_launch_site`, as ``gpu_idle_by_launch_site``), with the GPU's
    time by kernel (:func:`time_by_kernel`, as ``gpu_time_by_kernel``); its idle figures read
    higher still.
    """
    marker = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if trace_host:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities, with_stack=trace_host) as profiler:
        marker.zero_()
        with host_syncs() as syncs:
            run_step()
        torch.cuda.synchronize()
        marker.zero_()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    result = {**busy_and_idle(events), "host_syncs": sum(syncs.values()), "host_syncs_by_line": syncs}
    if trace_host:
        result["gpu_idle_by_launch_site"] = idle_by_launch_site(events)
        result["gpu_time_by_kernel"] = time_by_kernel(events)
    return result


SYNC_WARNING = "called a synchronizing CUDA operation"
"""What torch.cuda's sync debug mode warns with."""


@contextlib.contextmanager
def host_syncs():
    """Counts the times the host waits for the GPU inside the block (torch.cuda's sync debug
    mode: a copy to the host, ``.item()``, a copy from pageable memory, ``nonzero``...), by the
    Python line that asked: yields ``{"path:line": count}``, filled when the block ends (paths
    from their package folder on)."""
    found: dict[str, int] = {}
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if SYNC_WARNING in str(warning.message):
            where = f"{_package_path(warning.filename)}:{warning.lineno}"
            found[where] = found.get(where, 0) + 1


def _package_path(filename: str) -> str:
    """``.../site-packages/megatron/core/x.py`` → ``megatron/core/x.py``; the repository's files
    from their top folder on (``megatron_emo/``, ``tools/``, ``tests/``, ``examples/``)."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    for top in ("megatron_emo", "tools", "tests", "examples"):
        if top in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(top):])
    return filename


def busy_and_idle(events: list[dict]) -> dict[str, float]:
    """From a profiler trace's events (Chrome trace format, times in µs) of one step, in ms:
    ``gpu_busy_ms``, the union of the GPU's kernels, copies and memsets, every stream together,
    and ``gpu_idle_ms``, the rest of their span, from the first one's start to the last one's end."""
    work = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_WORK]
    if not work:
        raise RuntimeError("the profiler recorded no GPU work (no CUDA activity tracing here?)")
    span = max(last for _, last in work) - min(first for first, _ in work)
    busy = union_length(work)
    return {"gpu_busy_ms": busy / 1e3, "gpu_idle_ms": (span - busy) / 1e3}


LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
"""Trace categories of the host's launch calls (kernels, copies, memsets)."""


def idle_by_launch_site(events: list[dict], *, top: int = 30) -> list[dict]:
    """Where the GPU's idle time comes from, from a trace of one step with the host's ops and
    Python calls (``with_stack``): each gap before a piece of GPU work is charged to the host
    code that launched that work (the GPU waited for the host to get there), named by the
    innermost Python call of this package or megatron-core and the innermost op around the
    launch.

    Returns:
        the ``top`` sites by idle time: ``{"site", "idle_ms", "gaps"}``, largest first; gaps
        whose launch is not in the trace are charged to ``"(launch not traced)"``.
    """
    work = sorted((e for e in events if e.get("cat") in GPU_WORK), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    gaps = []  # (idle µs, the launch of the work after the gap, or None)
    reached = work[0]["ts"] if work else 0.0
    for event in work:
        if event["ts"] > reached:
            gaps.append((event["ts"] - reached, launches.get(event.get("args", {}).get("correlation"))))
        reached = max(reached, event["ts"] + event["dur"])
    traced = [launch for _, launch in gaps if launch is not None]
    frames = innermost_enclosing(
        [e for e in events if e.get("cat") == "python_function" and "megatron" in e["name"]], traced)
    ops = innermost_enclosing([e for e in events if e.get("cat") == "cpu_op"], traced)

    def site(launch) -> str:
        if launch is None:
            return "(launch not traced)"
        return f"{frames.get(id(launch)) or '(no Python frame)'} | {ops.get(id(launch)) or launch['name']}"

    return _tally(((site(launch), idle / 1e3) for idle, launch in gaps), top, label="site", total="idle_ms",
                  count="gaps")


def time_by_kernel(events: list[dict], *, top: int = 40) -> list[dict]:
    """The ``top`` kernels (copies, memsets) of a trace by their summed GPU time:
    ``{"name", "ms", "count"}``, largest first (names cut at 120 characters)."""
    kernels = ((e["name"][:120], e["dur"] / 1e3) for e in events if e.get("cat") in GPU_WORK)
    return _tally(kernels, top, label="name", total="ms", count="count")


def _tally(items: Iterable[tuple[str, float]], top: int, *, label: str, total: str, count: str) -> list[dict]:
    """``(name, amount)`` pairs summed by name: the ``top`` names by their sum, largest first,
    as ``{label: name, total: sum, count: pairs}``."""
    sums: dict[str, list] = {}
    for name, amount in items:
        entry = sums.setdefault(name, [0.0, 0])
        entry[0] += amount
        entry[1] += 1
    ranked = sorted(sums.items(), key=lambda item: -item[1][0])[:top]
    return [{label: name, total: value, count: pairs} for name, (value, pairs) in ranked]


def innermost_enclosing(spans: list[dict], points: list[dict]) -> dict[int, str]:
    """For each of ``points`` (trace events), the name of the innermost of ``spans`` (nested
    trace events) of the same thread that covers its start, keyed by ``id(point)``; points
    that none covers are left out. One sweep in time order per thread."""
    names = {}
    by_thread: dict = {}
    for span in spans:
        by_thread.setdefault(span.get("tid"), ([], []))[0].append(span)
    for point in points:
        by_thread.setdefault(point.get("tid"), ([], []))[1].append(point)
    for thread_spans, thread_points in by_thread.values():
        thread_spans.sort(key=lambda e: e["ts"])
        thread_points.sort(key=lambda e: e["ts"])
        open_spans, next_span = [], 0
        for point in thread_points:
            time = point["ts"]
            while next_span < len(thread_spans) and thread_spans[next_span]["ts"] <= time:
                span = thread_spans[next_span]
                while open_spans and open_spans[-1]["ts"] + open_spans[-1]["dur"] < span["ts"]:
                    open_spans.pop()
                open_spans.append(span)
                next_span += 1
            while open_spans and open_spans[-1]["ts"] + open_spans[-1]["dur"] < time:
                open_spans.pop()
            if open_spans:
                names[id(point)] = open_spans[-1]["name"]
    return names
