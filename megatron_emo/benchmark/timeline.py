"""Where a training step's time goes, by component, from marks at module boundaries.

Marks are taken when a component's forward starts and ends (forward hooks), when its backward
starts and ends (full backward hooks), and around the optimizer step: CUDA events on the GPU
(GPU time between launches, idle gaps included), the host clock on the CPU (where every op is
synchronous). The time between two consecutive marks belongs to the innermost component open at
the first of them. Inside an MoE layer but outside its router and experts, the time is
``dispatch`` before the routed experts run and ``combine`` after them in the forward, the
reverse in the backward (the combine's gradient comes first). Everything else (embeddings,
norms, residuals, the loss, data, gradient bookkeeping) is ``other``.

The hooks add a little work, so the breakdown comes from steps of their own, after the timed ones.
"""

import contextlib
import time

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_layer import TransformerLayer

COMPONENTS = ("attention", "router", "dispatch", "experts", "shared_expert", "combine", "lm_head", "optimizer", "other")
"""Reported components; a dense model's MLP counts as ``experts``."""

MOE = "moe"
"""Label of an MoE layer: a container whose own time is dispatch or combine."""


def component_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(label, module) of every timed module: per layer its attention, and its MoE layer with
    router, routed experts and shared experts (or its dense MLP); the LM head."""
    found = []
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            found.append(("attention", module.self_attention))
            mlp = module.mlp
            if hasattr(mlp, "router"):
                found += [(MOE, mlp), ("router", mlp.router), ("experts", mlp.experts)]
                if getattr(mlp, "shared_experts", None) is not None:
                    found.append(("shared_expert", mlp.shared_experts))
            else:
                found.append(("experts", mlp))
        elif isinstance(module, GPTModel) and module.post_process:
            found.append(("lm_head", module.output_layer))
    return found


class Timeline:
    """Marks of the instrumented steps and their attribution to components."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.marks = []  # (clock, label of the interval starting here); None ends a step
        self.open = []  # innermost last: [label, routed experts done (MoE layers only)]
        self.backward = False
        self.steps = 0

    def _clock(self):
        if not self.on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _mark(self, label) -> None:
        self.marks.append((self._clock(), label))

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
        try:
            yield
        finally:
            self._mark(None)
            self.steps += 1

    def milliseconds_per_step(self) -> dict[str, float]:
        """Mean time per instrumented step of every component, in ms."""
        if self.on_gpu:
            torch.cuda.synchronize()
        totals = dict.fromkeys(COMPONENTS, 0.0)
        for (start, label), (end, _) in zip(self.marks, self.marks[1:]):
            if label is None:
                continue  # between steps
            elapsed = start.elapsed_time(end) if self.on_gpu else (end - start) * 1e3
            totals[label] += elapsed
        return {name: value / max(self.steps, 1) for name, value in totals.items()}


def _module_hooks(module: torch.nn.Module, label: str, timeline: Timeline) -> list:
    """Marks from forward hooks and full backward hooks (backward ends once the gradients of
    all the module's inputs are done, whoever else consumes those inputs)."""
    return [
        module.register_forward_pre_hook(lambda m, args: timeline.enter(label, backward=False)),
        module.register_forward_hook(lambda m, args, out: timeline.exit(label)),
        module.register_full_backward_pre_hook(lambda m, grad: timeline.enter(label, backward=True)),
        module.register_full_backward_hook(lambda m, grad_in, grad_out: timeline.exit(label)),
    ]


def _tensor_hooks(module: torch.nn.Module, label: str, timeline: Timeline) -> list:
    """Marks from forward hooks, with backward marks from gradient hooks on the module's output
    and first input: for the LM head, whose logits megatron-core's cross-entropy modifies in
    place, which full backward hooks refuse; its input feeds nothing else."""

    def before(m, args):
        timeline.enter(label, backward=False)
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: timeline.exit(label))

    def after(m, args, output):
        timeline.exit(label)
        first = output[0] if isinstance(output, tuple) else output
        if first.requires_grad:
            first.register_hook(lambda grad: timeline.enter(label, backward=True))

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


@contextlib.contextmanager
def instrument(model: torch.nn.Module, timeline: Timeline):
    """Hooks on the components of ``model`` that mark ``timeline``, removed on exit."""
    handles = []
    for label, module in component_modules(model):
        hooks = _tensor_hooks if label == "lm_head" else _module_hooks
        handles += hooks(module, label, timeline)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
