"""The tiny recipe end to end through the command line, in its own process."""

import json
import subprocess
import sys

import pytest


def _train(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny",
           "--set", f"train.output_dir={str(tmp_path)!r}", *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode", ["emo", "topk"])
def test_tiny_run_loss_falls(tmp_path, mode):
    result = _train(tmp_path, f"model.emo_router_mode={mode!r}", "train.steps=40", "optim.warmup_steps=5",
                    "train.log_interval=5")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.7, (first["loss"], last["loss"])
    for record in records:
        assert record["lb_loss"] > 0 and record["z_loss"] > 0 and record["tokens_per_s"] > 0
        assert len(record["load_max_over_mean"]) == 4  # one entry per MoE layer
    # 16 routed experts: EMO pools of 4..16 average about 10; top-k mode uses all of them.
    pools = [r["pool_experts"] for r in records]
    assert all(p < 13 for p in pools) if mode == "emo" else all(p == 16 for p in pools)
    assert (tmp_path / "checkpoints" / "step_00000040" / "tokenizer.model").is_file()
    assert (tmp_path / "run_config.json").is_file() and (tmp_path / "run_info.json").is_file()
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.emo_pool_min=1", "emo_pool_min"),
        ("model.emo_pool_min=20", "emo_pool_min"),
        ("model.not_a_field=1", "not_a_field"),
        ("train.steps='many'", "train.steps"),
        ("optim.warmup_steps=1000", "optim.warmup_steps"),
    ],
)
def test_bad_settings_fail_fast_with_the_field_named(tmp_path, override, message):
    result = _train(tmp_path, override)
    assert result.returncode == 2
    assert message in result.stderr and "error:" in result.stderr


@pytest.mark.gpu
def test_tiny_run_on_gpu_in_bf16(tmp_path):
    result = _train(tmp_path, "train.steps=30", "optim.warmup_steps=5", "train.log_interval=5",
                    "model.bf16=True", "train.tensorboard=False")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    for op in ("document-pooled routing", "grouped_gemm", "permutation"):
        assert f"{op}: path = triton" in result.stderr
    assert records[-1]["max_memory_gib"] > 0
    # The checkpoint of the GPU run (megatron-core's optimizer) resumes.
    result = _train(tmp_path, "train.steps=35", "optim.warmup_steps=5", "train.log_interval=5",
                    "model.bf16=True", "train.tensorboard=False")
    assert result.returncode == 0 and "at step 30" in result.stderr, result.stderr[-3000:]


# --- bad data fails fast through the command line ---------------------------------------------------


def _data_overrides(prefix, tokenizer_model, cache_dir):
    return (f"data.blend=[[1.0,{str(prefix)!r}]]", f"data.tokenizer_model={str(tokenizer_model)!r}",
            f"data.cache_dir={str(cache_dir)!r}", "train.steps=2", "optim.warmup_steps=1", "train.eval_interval=0",
            "train.log_interval=1", "train.tensorboard=False", "data.seq_length=64", "model.num_layers=1")


@pytest.fixture(scope="module")
def bad_data_runs(tmp_path_factory):
    """Two CLI runs on bad data, started together (each spends seconds importing megatron-core):
    a blend prefix that does not exist, and a dataset whose token ids exceed the vocabulary."""
    from megatron_emo.data.demo_corpus import docs_documents
    from megatron_emo.data.indexed import AtomicDatasetWriter
    from megatron_emo.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bad_data")
    tokenizer = train_tokenizer(docs_documents()[:80], root / "tok.model", vocab_size=512)  # padded: 512
    # made with another, larger tokenizer: ids up to 5000, the same EOS
    with AtomicDatasetWriter(root / "big_vocab", tokenizer="big.model", vocab_size=8192, eos_id=tokenizer.eos_id) as w:
        for k in range(50):
            w.add_document([5000 - k, 17, 42, 100 + k])
    cases = {"missing": root / "nowhere" / "data", "big_vocab": root / "big_vocab"}
    procs = {}
    for name, prefix in cases.items():
        out = root / f"run_{name}"
        cmd = [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny",
               "--set", f"train.output_dir={str(out)!r}",
               *(a for o in _data_overrides(prefix, root / "tok.model", root / f"cache_{name}") for a in ("--set", o))]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        results = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        yield root, results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_missing_blend_prefix_exits_2_naming_the_file(bad_data_runs):
    root, results = bad_data_runs
    result = results["missing"]
    assert result.returncode == 2, result.stderr[-3000:]
    nowhere = root / "nowhere"
    assert f"error: dataset {nowhere / 'data'}: {nowhere / 'data.idx'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "run_missing" / "metrics.jsonl").exists()  # nothing was trained


def test_token_ids_beyond_the_vocabulary_exit_2(bad_data_runs):
    root, results = bad_data_runs
    result = results["big_vocab"]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: dataset" in result.stderr and str(root / "big_vocab") in result.stderr
    assert "token id 5000 does not fit the model's vocabulary of 512" in result.stderr
    assert "another tokenizer (big.model)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "run_big_vocab" / "metrics.jsonl").exists()
