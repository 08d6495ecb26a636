"""tools/benchmark_throughput.py: the tiny recipe through every case in its own process (and
once on a real indexed dataset), then the pieces it is built from in this process: the FLOP
count by hand, the attribution of a step's time, the loop router, synthetic documents and the
handling of a failing case."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_emo.benchmark.synthetic import SyntheticDocuments
from megatron_emo.benchmark.timeline import COMPONENTS, Timeline
from megatron_emo.data.demo_corpus import docs_documents
from megatron_emo.data.preprocess import preprocess
from megatron_emo.data.tokenizer import train_tokenizer
from megatron_emo.kernels.routing import reference
from tests.conftest import load_tool

TOOLS = Path(__file__).resolve().parents[2] / "tools"
CASES = ["emo", "topk", "dense", "loop-router", "mcore-moe"]
# The tiny recipe cut to one layer: h 128, 4 heads of 32, 16 routed experts top-2 + 1 shared of
# 64, 64-token rows, vocabulary 2048.
TINY = ["--recipe", "tiny", "--set", "model.num_layers=1", "--set", "data.seq_length=64",
        "--set", "data.global_batch_size=4", "--set", "data.micro_batch_size=2",
        "--warmup", "1", "--steps", "2", "--profile-steps", "1"]


def _start(out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOOLS / "benchmark_throughput.py"), *args, "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    (result,) = out.glob("*_throughput.json")
    return {"stdout": stdout, "json": result, **json.loads(result.read_text())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The synthetic run of every case and a real-data run of ``emo``, started together."""
    root = tmp_path_factory.mktemp("throughput")
    synthetic = _start(root / "synthetic", *TINY, "--docs-per-row", "4", "--cases", ",".join(CASES))
    train_tokenizer(docs_documents()[:60], root / "tok.model", vocab_size=512)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs_documents()[:60]))
    preprocess([root / "docs.jsonl"], root / "data" / "docs", root / "tok.model", progress=False)
    real = _start(root / "real", *TINY, "--cases", "emo", "--data", "recipe",
                  "--set", f"data.blend=[[1.0, {str(root / 'data' / 'docs')!r}]]",
                  "--set", f"data.tokenizer_model={str(root / 'tok.model')!r}",
                  "--set", f"data.cache_dir={str(root / 'cache')!r}")
    try:
        yield {"synthetic": _finish(synthetic, root / "synthetic"), "real": _finish(real, root / "real")}
    finally:
        for proc in (synthetic, real):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_every_case_runs_and_records_the_documented_fields(runs):
    result = runs["synthetic"]
    records = {r["case"]: r for r in result["records"]}
    assert list(records) == CASES
    for name, record in records.items():
        assert record["status"] == "ok", (name, record.get("traceback"))
        assert record["device"] == "cpu" and record["recipe"] == "tiny"
        assert record["packages"]["torch"] and record["packages"]["megatron-core"] and record["git_commit"]
        assert record["layout"] == {"world_size": 1, "data_parallel": 1, "tensor_parallel": 1, "pipeline_parallel": 1,
                                    "context_parallel": 1, "expert_parallel": 1, "expert_tensor_parallel": 1}
        assert record["tokens_per_s_per_gpu"] > 0 and len(record["step_times_s"]) == 2
        assert record["mfu"] is None and record["peak_tflops"] is None  # no GPU peak on the CPU
        assert all(math.isfinite(loss) for loss in record["losses"])
        assert set(record["breakdown_ms"]) == set(COMPONENTS)
    assert records["emo"]["vs_emo"]["tokens_per_s"] == 1.0
    assert records["mcore-moe"]["mcore_experts"] == "SequentialMLP"
    # The loop router replaces the package's routing, so the routing path is never logged.
    assert records["emo"]["kernel_paths"]["document-pooled routing"] == "reference"
    assert "document-pooled routing" not in records["loop-router"]["kernel_paths"]
    by_name = {t["target"]: t for t in result["targets"]}
    gpu_only = {"emo MFU", "emo optimizer memory-bound / measured ms"}  # no GPU peak or copy bandwidth here
    assert all(by_name[name]["value"] is None for name in gpu_only)
    assert all(t["value"] is not None for name, t in by_name.items() if name not in gpu_only)
    assert 0 < by_name["emo step share outside other"]["value"] <= 1
    assert "FLOPs per token (emo): 0.003 G training" in result["stdout"]


def test_time_breakdown_finds_each_component(runs):
    records = {r["case"]: r for r in runs["synthetic"]["records"]}
    everywhere = ("embedding", "norms", "attention", "experts", "lm_head", "loss")
    for name, record in records.items():
        breakdown = record["breakdown_ms"]
        assert list(breakdown) == list(COMPONENTS), name
        assert all(breakdown[part] > 0 for part in everywhere), name
        # The components add up to the instrumented step; the GPU's idle time is not measured on the CPU.
        assert sum(breakdown.values()) == pytest.approx(record["breakdown_step_ms"], rel=1e-6), name
        assert not {"gpu_idle_ms", "gpu_busy_ms", "gpu_idle_error"} & set(record), name
    for name in ("emo", "topk", "loop-router", "mcore-moe"):
        assert all(records[name]["breakdown_ms"][part] > 0 for part in COMPONENTS), name
    dense = records["dense"]["breakdown_ms"]
    assert dense["router"] == dense["dispatch"] == dense["combine"] == dense["shared_expert"] == 0.0


@pytest.mark.gpu
def test_gpu_run_measures_the_gpus_idle_time(tmp_path):
    result = _finish(_start(tmp_path, *TINY, "--cases", "emo,dense", "--trace-host"), tmp_path)
    for record in result["records"]:
        assert record["status"] == "ok", record.get("traceback")
        assert "breakdown_error" not in record and "gpu_idle_error" not in record, record
        # CUDA events time each interval to about a microsecond.
        assert sum(record["breakdown_ms"].values()) == pytest.approx(record["breakdown_step_ms"], rel=0.01)
        assert record["gpu_busy_ms"] > 0 and record["gpu_idle_ms"] > 0
        # The model's forward and backward never wait for the GPU; the step may (its loss, the
        # gradient norm).
        assert record["host_syncs"] == sum(record["host_syncs_by_line"].values())
        hot_path = ("megatron_emo/model/", "megatron_emo/routing/", "megatron_emo/kernels/", "megatron_emo/experts/")
        assert not [line for line in record["host_syncs_by_line"] if line.startswith(hot_path)], record
        # The traced step charges its idle time to launch sites (the largest ones) and sums its kernels.
        assert 0 < sum(site["idle_ms"] for site in record["gpu_idle_by_launch_site"]) <= record["gpu_idle_ms"] + 1e-6
        assert record["gpu_time_by_kernel"][0]["ms"] >= record["gpu_time_by_kernel"][-1]["ms"] > 0
        # An H100 or H200 copies at 2-4.8 TB/s; the optimizer's bound is its bytes at that rate.
        assert 500 < record["copy_bandwidth_gb_s"] < 10_000
        assert record["optimizer_memory_bound_ms"] == pytest.approx(
            record["num_params"] * 38 / (record["copy_bandwidth_gb_s"] * 1e9) * 1e3)
    target = next(t for t in result["targets"] if t["target"].startswith("emo optimizer"))
    assert target["value"] > 0


def test_flops_equal_a_hand_computation(runs):
    attention = 2 * 128 * (128 + 2 * 128) + 2 * 128 * 128 + 4 * 64 * 128  # projections + full s×s scores
    router = 2 * 128 * 16
    experts = (2 + 1) * 3 * 2 * 128 * 64  # routed top-2 and the shared expert, SwiGLU
    lm_head = 2 * 128 * 2048
    records = {r["case"]: r["flops"] for r in runs["synthetic"]["records"]}
    for name in ("emo", "topk", "loop-router", "mcore-moe"):
        assert records[name]["training_per_token"] == 3 * (attention + router + experts + lm_head), name
        causal = 3 * (attention - 2 * 64 * 128 + router + experts + lm_head)
        assert records[name]["training_per_token_causal_attention"] == causal
    assert records["dense"]["training_per_token"] == 3 * (attention + experts + lm_head)


def test_outputs_are_named_by_date_device_and_recipe(runs):
    path = runs["synthetic"]["json"]
    assert path.name.endswith("_cpu_tiny_throughput.json")
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_are_written_after_every_case(runs):
    """A run cut short keeps the cases it finished: the JSON is rewritten as each case ends,
    before the next begins."""
    lines = runs["synthetic"]["stdout"].splitlines()
    for done, name in enumerate(CASES, start=1):
        wrote = lines.index(f"wrote {runs['synthetic']['json']} ({done} of its cases)")
        assert lines[wrote - 1].startswith(f"[{name}] ")
        if done < len(CASES):
            assert lines[wrote + 1].startswith(f"[{CASES[done]}] ")


def test_real_data_run(runs):
    (record,) = runs["real"]["records"]
    assert record["status"] == "ok" and record["data"] == "recipe"
    assert record["tokens_per_s_per_gpu"] > 0
    # The tokenizer's 512 pieces padded to a multiple of 64: the LM head of a 512-row vocabulary.
    assert record["flops"]["forward_per_token_by_component"]["lm_head"] == 2 * 128 * 512


def test_trace_host_is_refused_where_no_step_would_be_traced(capsys):
    tool = load_tool("benchmark_throughput")
    with pytest.raises(SystemExit):
        tool.parse_args(["--trace-host", "--profile-steps", "0", "--output", "out"])
    assert "--trace-host traces the GPU-idle step" in capsys.readouterr().err


def test_failing_case_is_recorded_not_raised():
    from megatron_emo.benchmark.cases import Case
    from megatron_emo.benchmark.runner import run_case
    from megatron_emo.recipes import get_recipe
    from megatron_emo.training.distributed import Runtime

    def build(*args):
        raise RuntimeError("out of memory, say")

    runtime = Runtime(device=torch.device("cpu"), rank=0, world_size=1, data_parallel_rank=0, data_parallel_size=1)
    record = run_case(Case("broken", "fails to build", build), get_recipe("tiny"), runtime, None, vocab_size=64,
                      eos_id=2, warmup=1, steps=1, profile_steps=0, progress=lambda message: None)
    assert record["status"] == "failed" and record["error"] == "RuntimeError: out of memory, say"
    assert "raise RuntimeError" in record["traceback"]


def test_timeline_attributes_moe_gaps_to_dispatch_and_combine():
    timeline = Timeline(on_gpu=False)
    seen = []

    def step(action, label, **kwargs):
        getattr(timeline, action)(label, **kwargs)
        seen.append(timeline.current())

    # Forward: router, then dispatch, experts, combine, shared expert; backward in reverse, the
    # combine's gradient first.
    step("enter", "moe", backward=False)
    step("enter", "router", backward=False)
    step("exit", "router")
    step("enter", "experts", backward=False)
    step("exit", "experts")
    step("enter", "shared_expert", backward=False)
    step("exit", "shared_expert")
    step("exit", "moe")
    step("enter", "moe", backward=True)
    step("enter", "experts", backward=True)
    step("exit", "experts")
    step("enter", "router", backward=True)
    step("exit", "router")
    step("exit", "moe")
    assert seen == ["dispatch", "router", "dispatch", "experts", "combine", "shared_expert", "combine", "other",
                    "combine", "experts", "dispatch", "router", "dispatch", "other"]


def test_loop_router_routes_as_the_reference():
    loop_router = load_tool("loop_router")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 12, generator=generator, dtype=torch.float64)
    segment_ids = torch.tensor([0] * 7 + [1] * 13 + [2] * 1 + [3] * 19)
    pool_sizes = torch.tensor([3, 12, 5, 8] + [0] * 36)
    for pools in (pool_sizes, None):
        expected = reference.route(logits, segment_ids, pools, 3, return_logsumexp=True)
        got = loop_router.per_document_loop_route(logits, segment_ids, pools, 3, return_logsumexp=True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


def test_synthetic_documents():
    data = SyntheticDocuments(seq_length=50, vocab_size=100, eos_id=2, docs_per_row=6, seed=1)
    sample = data[7]
    assert int((sample["tokens"][1:] == 2).sum()) == 5 and int(sample["tokens"].min()) >= 2
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(data[7]["tokens"], sample["tokens"]) and not torch.equal(data[8]["tokens"], sample["tokens"])
    with pytest.raises(ValueError, match="docs_per_row=60"):
        SyntheticDocuments(seq_length=50, vocab_size=100, eos_id=2, docs_per_row=60)

