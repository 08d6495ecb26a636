"""megatron_emo.benchmark.timeline: a step's marks on a small model (what the embedding, norms,
LM head and loss cover) and the GPU's idle time from hand-made profiler events."""

import pytest
import torch

from megatron_emo.benchmark.timeline import (
    COMPONENTS,
    Timeline,
    busy_and_idle,
    idle_by_launch_site,
    instrument,
    time_by_kernel,
    union_length,
)
from megatron_emo.model.document_batch import DocumentBatch, run_model
from megatron_emo.model.gpt import build_gpt_model
from megatron_emo.routing.documents import TrainingPools
from tests.conftest import make_config

EOS = 2


def _labels(timeline: Timeline) -> list:
    """The marks' labels, repeats merged."""
    labels = []
    for _, label in timeline.marks:
        if not labels or labels[-1] != label:
            labels.append(label)
    return labels


def test_a_model_step_is_split_into_every_part(megatron_cpu):
    model = build_gpt_model(make_config(num_layers=1), max_sequence_length=32, rotary_base=10_000)
    model.train()
    timeline = Timeline(on_gpu=False)
    # Where the timeline stands when each weight's gradient is accumulated.
    accumulated = {}
    for name, param in (("lm_head", model.output_layer.weight), ("embedding", model.embedding.word_embeddings.weight)):
        param.register_post_accumulate_grad_hook(lambda p, name=name: accumulated.update({name: timeline.current()}))
    tokens = torch.randint(4, 64, (2, 24))
    tokens[:, 5::7] = EOS
    documents = DocumentBatch.of(tokens, EOS, seed=7, step=0, sample_index=torch.arange(2),
                                 pools=TrainingPools.of(model.config))
    with instrument(model, timeline):
        for _ in range(2):
            with timeline.step():
                run_model(model, tokens, documents, labels=torch.roll(tokens, -1, dims=1)).mean().backward()

    # Both LM-head matmuls of the backward are the LM head's, the embedding's backward runs
    # until its weight's gradient is in.
    assert accumulated == {"lm_head": "lm_head", "embedding": "embedding"}
    labels = _labels(timeline)
    forward = ["other", "embedding", "other", "rotary", "other", "norms", "other", "attention", "other", "norms",
               "other", "dispatch", "router", "dispatch", "experts", "combine", "shared_expert", "combine", "other",
               "norms", "other", "lm_head", "other", "loss", "other"]
    backward = ["lm_head", "other", "norms", "other", "combine", "shared_expert", "combine", "experts", "dispatch",
                "router", "dispatch", "other", "norms", "other", "attention", "other", "norms", "other", "embedding",
                "other", None]
    assert labels == (forward + backward) * 2
    breakdown = timeline.milliseconds_per_step()
    assert set(breakdown) == set(COMPONENTS)
    assert all(breakdown[name] > 0 for name in COMPONENTS if name != "optimizer")
    assert sum(breakdown.values()) == pytest.approx(timeline.step_milliseconds(), rel=1e-9)
    # Removed on exit: a step outside marks nothing.
    marks = len(timeline.marks)
    run_model(model, tokens, documents, labels=tokens).mean().backward()
    assert len(timeline.marks) == marks


def test_union_length():
    assert union_length([]) == 0
    # Overlapping, nested, touching and unsorted.
    assert union_length([(7, 8), (1, 3), (2, 5), (7.2, 7.8), (5, 6), (-2, 0.5)]) == pytest.approx(2.5 + 5 + 1)


def test_gpu_idle_is_the_span_of_the_gpus_work_less_its_union():
    events = [
        {"ph": "X", "cat": "kernel", "name": "marker", "ts": 1000.0, "dur": 2.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1100.0, "dur": 5.0},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "step", "ts": 500.0, "dur": 20_000.0},
        {"ph": "X", "cat": "cuda_sync", "name": "Stream Sync", "ts": 9000.0, "dur": 1000.0},
        # Two streams overlapping, a copy and a memset.
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1500.0, "dur": 2000.0, "tid": 7},
        {"ph": "X", "cat": "kernel", "name": "all_reduce", "ts": 3000.0, "dur": 1000.0, "tid": 13},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 5000.0, "dur": 500.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 5400.0, "dur": 200.0},
        {"ph": "X", "cat": "kernel", "name": "marker", "ts": 10_998.0, "dur": 2.0},
    ]
    # Busy: 1000-1002, 1500-4000, 5000-5600 and 10998-11000 µs of 1000-11000.
    assert busy_and_idle(events) == pytest.approx({"gpu_busy_ms": 3.104, "gpu_idle_ms": 6.896})
    with pytest.raises(RuntimeError, match="no GPU work"):
        busy_and_idle(events[1:4])


def test_idle_time_is_charged_to_the_code_that_launched_the_work_after_each_gap():
    def span(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args}

    events = [
        span("python_function", "megatron_emo/model/layer.py(10): forward", 0.0, 1000.0),
        span("python_function", "megatron_emo/routing/router.py(20): forward", 100.0, 300.0),
        span("python_function", "torch/nn/functional.py(30): softmax", 120.0, 50.0),
        span("cpu_op", "aten::softmax", 125.0, 40.0),
        span("cuda_runtime", "cudaLaunchKernel", 130.0, 5.0, correlation=2),
        span("cpu_op", "aten::mm", 500.0, 40.0),
        span("cuda_runtime", "cudaLaunchKernel", 510.0, 5.0, correlation=3),
        span("cuda_driver", "cuLaunchKernelEx", 700.0, 5.0, correlation=5),
        {"ph": "X", "cat": "kernel", "name": "first", "ts": 0.0, "dur": 100.0, "args": {"correlation": 1}},
        # 40 µs idle, then the router's softmax; 10 more, then the layer's matmul.
        {"ph": "X", "cat": "kernel", "name": "softmax", "ts": 140.0, "dur": 500.0, "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "overlapped", "ts": 600.0, "dur": 10.0, "args": {"correlation": 4}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 650.0, "dur": 50.0, "args": {"correlation": 3}},
        # Launched outside every span; then a kernel whose launch the trace lacks.
        {"ph": "X", "cat": "kernel", "name": "triton", "ts": 720.0, "dur": 10.0, "args": {"correlation": 5}},
        {"ph": "X", "cat": "kernel", "name": "lost", "ts": 760.0, "dur": 10.0, "args": {"correlation": 9}},
    ]
    sites = idle_by_launch_site(events)
    assert sites == [
        {"site": "megatron_emo/routing/router.py(20): forward | aten::softmax", "idle_ms": pytest.approx(0.04),
         "gaps": 1},
        {"site": "(launch not traced)", "idle_ms": pytest.approx(0.03), "gaps": 1},
        {"site": "megatron_emo/model/layer.py(10): forward | cuLaunchKernelEx", "idle_ms": pytest.approx(0.02),
         "gaps": 1},
        {"site": "megatron_emo/model/layer.py(10): forward | aten::mm", "idle_ms": pytest.approx(0.01), "gaps": 1},
    ]
    assert sum(site["idle_ms"] for site in sites) == pytest.approx(busy_and_idle(events)["gpu_idle_ms"])
    assert time_by_kernel(events, top=2) == [{"name": "softmax", "ms": pytest.approx(0.5), "count": 1},
                                             {"name": "first", "ms": pytest.approx(0.1), "count": 1}]
