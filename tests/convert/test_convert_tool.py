"""tools/convert_to_hf.py on a checkpoint of a real (3-step) tiny training run."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from megatron_emo.convert.megatron_checkpoint import find_tokenizer, load_checkpoint_for_export  # noqa: E402
from megatron_emo.data.tokenizer import Tokenizer  # noqa: E402
from megatron_emo.model.gpt import build_gpt_model  # noqa: E402
from tests.conftest import load_tool  # noqa: E402
from tests.convert.common import hf_greedy, our_greedy, our_logits  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_to_hf.py"
PROMPT = "def read_file(path):\n    "


def _tool():
    return load_tool("convert_to_hf")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cmd = [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny",
           "--set", "train.steps=3", "--set", "optim.warmup_steps=1",
           "--set", f"train.output_dir={str(root / 'run')!r}", "--set", f"data.cache_dir={str(root / 'cache')!r}",
           # Shorter than the recipe: 64-token rows, no validation or TensorBoard.
           "--set", "data.seq_length=64", "--set", "train.eval_interval=0", "--set", "train.tensorboard=False"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def exported(run_dir):
    """The run's checkpoints folder → HF folder (sharded), then --generate, in a subprocess."""
    output = run_dir.parent / "hf"
    cmd = [sys.executable, str(TOOL), "--checkpoint", str(run_dir / "checkpoints"), "--output", str(output),
           "--max-shard-size", "3MB", "--generate", PROMPT, "--max-new-tokens", "8"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def test_export_writes_a_stock_transformers_folder(exported):
    output, stdout = exported
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model"} <= names
    assert len([n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]) > 1
    assert "step 3" in stdout and "greedy continuation (8 tokens" in stdout
    assert not list(output.parent.glob(".tmp-*"))


def test_generation_and_logits_match_our_model(exported, run_dir, megatron_cpu):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, stdout = exported
    checkpoint = load_checkpoint_for_export(run_dir / "checkpoints")
    tokenizer = Tokenizer(find_tokenizer(checkpoint.run, checkpoint.path))
    config = checkpoint.emo_config(eos_token_id=tokenizer.eos_id, emo_eval_pool=None)
    gpt = checkpoint.gpt_settings()
    model = build_gpt_model(config, max_sequence_length=gpt.max_position_embeddings, rotary_base=gpt.rotary_base,
                            share_embeddings=gpt.share_embeddings).eval()
    model.load_state_dict(checkpoint.state_dict)

    hf_tokenizer = AutoTokenizer.from_pretrained(str(output))
    prompt_ids = tokenizer.encode(PROMPT)
    assert hf_tokenizer(PROMPT)["input_ids"] == prompt_ids
    hf = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"

    texts = ("The old man said that he would come back tomorrow, but", "import os\nimport sys\n\n\ndef main")
    tokens = torch.tensor([tokenizer.encode(text)[:12] for text in texts])
    with torch.no_grad():
        diff = (our_logits(model, tokens, tokenizer.eos_id) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff

    ours = our_greedy(model, prompt_ids, 8, tokenizer.eos_id)
    assert hf_greedy(hf, prompt_ids, 8) == ours
    printed = re.search(r"token ids: (\[.*\])", stdout).group(1)
    assert printed == str(ours)  # what the tool printed is our model's continuation


def test_generate_only_on_an_existing_folder(exported, capsys):
    output, _ = exported
    assert _tool().main(["--output", str(output), "--generate", "Hello", "--max-new-tokens", "3"]) == 0
    assert "greedy continuation (" in capsys.readouterr().out


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert _tool().main(["--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "hf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _tool().main(["--checkpoint", str(tmp_path / "empty"), "--output", str(tmp_path / "hf")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_corrupt_checkpoint_exits_2(run_dir, tmp_path, capsys):
    step = next((run_dir / "checkpoints").glob("step_*"))
    copy = tmp_path / step.name
    shutil.copytree(step, copy)
    shard = max(copy.glob("*.distcp"), key=lambda file: file.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    assert _tool().main(["--checkpoint", str(copy), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "truncated" in err
    assert not (tmp_path / "hf").exists()


def test_run_config_with_an_unknown_model_field_is_refused(tmp_path):
    from megatron_emo.checkpoint.store import CheckpointError
    from megatron_emo.convert.megatron_checkpoint import read_run_config

    (tmp_path / "run_config.json").write_text(json.dumps({"name": "old", "model": {"num_layer": 2}}))
    with pytest.raises(CheckpointError, match=r"model.num_layer is not an EmoConfig field \(did you mean num_layers"):
        read_run_config(tmp_path)


def test_existing_output_needs_force(exported, run_dir, capsys):
    output, _ = exported
    assert _tool().main(["--checkpoint", str(run_dir), "--output", str(output)]) == 2
    assert "--force" in capsys.readouterr().err


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("target", ["run", "checkpoints", "step", "inside_step"])
def test_force_never_touches_the_checkpoint_or_its_run(run_dir, capsys, target):
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    output = {"run": run_dir, "checkpoints": run_dir / "checkpoints", "step": step, "inside_step": step / "hf"}[target]
    before = _snapshot(run_dir)
    assert _tool().main(["--checkpoint", str(run_dir), "--output", str(output), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"error: refusing --output {output}: it " in err and f"e.g. {run_dir / 'hf'}" in err, err
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("change, named", [("a user's file", "notes.txt"), ("a subfolder", "eval"),
                                           ("no config.json", "config.json")])
def test_force_leaves_a_folder_that_is_not_only_an_export(exported, run_dir, tmp_path, capsys, change, named):
    output = tmp_path / "hf"
    shutil.copytree(exported[0], output)
    if change == "a user's file":
        (output / named).write_text("mine")
    elif change == "a subfolder":
        (output / named).mkdir()
    else:
        (output / named).unlink()
    before = _snapshot(output)
    assert _tool().main(["--checkpoint", str(run_dir), "--output", str(output), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"error: refusing to replace {output}: " in err and named in err, err
    assert _snapshot(output) == before


def test_force_replaces_an_earlier_export_quietly(exported, run_dir, tmp_path):
    output = tmp_path / "hf"
    shutil.copytree(exported[0], output)  # sharded: the new export is one file
    result = subprocess.run([sys.executable, str(TOOL), "--checkpoint", str(run_dir), "--output", str(output),
                             "--force"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in output.iterdir()}
    assert "model.safetensors" in names and not any(name.startswith("model-") for name in names)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary or earlier export left beside it
    for chatter in ("Megatron-FSDP", "load_state_dict", "Transformer Engine"):
        assert chatter not in result.stderr, result.stderr


def test_failed_export_keeps_the_earlier_one(exported, run_dir, tmp_path, capsys, monkeypatch):
    from megatron_emo.convert import hf_folder
    from megatron_emo.convert.qwen2_moe import ConversionError

    def fail(*args, **kwargs):
        raise ConversionError("disk full")

    output = tmp_path / "hf"
    shutil.copytree(exported[0], output)
    before = _snapshot(output)
    monkeypatch.setattr(hf_folder, "save_hf_model", fail)
    assert _tool().main(["--checkpoint", str(run_dir), "--output", str(output), "--force"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert _snapshot(output) == before and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_export_reads_back_to_the_checkpoint(exported, run_dir):
    from transformers import AutoConfig

    from megatron_emo.convert import hf_folder
    from megatron_emo.convert import qwen2_moe as q

    output, _ = exported
    checkpoint = load_checkpoint_for_export(run_dir / "checkpoints")
    imported = q.from_hf_config(AutoConfig.from_pretrained(str(output)))
    assert imported.gpt == checkpoint.gpt_settings()
    # The pool settings travel in emo_metadata, so the config comes back whole.
    config = imported.emo_config()
    original = checkpoint.emo_config(eos_token_id=imported.eos_token_id)
    for name in ("num_layers", "hidden_size", "num_moe_experts", "moe_router_topk", "emo_num_shared_experts",
                 "emo_pool_min", "emo_pool_max", "emo_eval_pool", "emo_router_mode", "layernorm_epsilon",
                 "emo_vocab_size", "emo_eos_token_id"):
        assert getattr(config, name) == getattr(original, name), name
    tensors = q.from_hf_state_dict(hf_folder.read_hf_weights(output), config, imported.gpt)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, checkpoint.state_dict[name]), name


# ---------------------------------------------------------------------------------------------
# tools/convert_from_hf.py: the export back into a checkpoint that training starts from

FROM_HF = ROOT / "tools" / "convert_from_hf.py"


def _weights(checkpoint) -> dict:
    from megatron_emo.checkpoint.store import read_tensors
    from megatron_emo.training.distributed import process_group

    with process_group():
        return read_tensors(checkpoint)


def test_import_back_reproduces_the_checkpoint_and_training_starts_from_it(run_dir, exported, tmp_path):
    from megatron_emo.checkpoint.store import verify_checkpoint

    output, _ = exported
    init = tmp_path / "init"
    result = subprocess.run([sys.executable, str(FROM_HF), "--hf", str(output), "--recipe", "tiny",
                             "--output", str(init)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    verify_checkpoint(init)
    assert (init / "tokenizer.model").read_bytes() == (output / "tokenizer.model").read_bytes()
    imported = _weights(init)
    tensors = _weights(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    assert set(imported) == set(tensors)
    assert all(torch.equal(imported[k], tensors[k]) for k in tensors)
    # The printed command starts a run from those weights: its first loss is the trained model's.
    # In a folder of its own: the parent of --output (tmp_path holds no run).
    sets = re.findall(r'--set "([^"]+)"', result.stdout)
    assert sets[-2:] == [f"train.init_from={str(init)!r}", f"train.output_dir={str(tmp_path)!r}"]
    train = [sys.executable, "-m", "megatron_emo.train", "--recipe", "tiny",
             *(arg for s in sets for arg in ("--set", s)),
             "--set", "train.steps=1", "--set", "optim.warmup_steps=0", "--set", "train.eval_interval=0",
             "--set", "train.tensorboard=False", "--set", "data.seq_length=64",
             "--set", f"data.cache_dir={str(run_dir.parent / 'cache')!r}"]
    trained = subprocess.run(train, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert trained.returncode == 0 and "started from the weights of" in trained.stderr, trained.stderr[-3000:]
    # --force replaces a checkpoint folder it wrote, never the run folder beside it.
    again = [sys.executable, str(FROM_HF), "--hf", str(output), "--recipe", "tiny", "--force"]
    replaced = subprocess.run([*again, "--output", str(init)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    verify_checkpoint(init)
    refused = subprocess.run([*again, "--output", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode == 2 and "not a checkpoint folder this tool wrote" in refused.stderr
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "metrics.jsonl").is_file()
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]  # a run's checkpoint, with its optimizer
    refused = subprocess.run([*again, "--output", str(step)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert refused.returncode == 2 and "not a checkpoint folder this tool wrote" in refused.stderr
    verify_checkpoint(step)


def test_import_refuses_what_it_cannot_read(tmp_path):
    result = subprocess.run([sys.executable, str(FROM_HF), "--hf", str(tmp_path), "--recipe", "tiny",
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 2 and "no config.json" in result.stderr


def test_weights_only_checkpoint_cannot_be_resumed_but_can_start_a_run(tmp_path, megatron_cpu):
    from megatron_emo.checkpoint.sharded_state import parameters_by_name
    from megatron_emo.checkpoint.store import CheckpointError, load_checkpoint, load_weights, write_weights_checkpoint
    from megatron_emo.model.gpt import build_gpt_model
    from megatron_emo.recipes import get_recipe
    from tests.conftest import make_config

    def tiny_model():
        return build_gpt_model(make_config(), max_sequence_length=16, rotary_base=10_000)

    model = tiny_model()
    weights = {name: param.detach() for name, param in parameters_by_name(model, model.config).items()}
    path = write_weights_checkpoint(tmp_path / "init", weights, get_recipe("tiny"))
    other = tiny_model()
    load_weights(path, other)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="weights only"):
        load_checkpoint(path, model=other, optimizer=None, scheduler=None)


def test_select_experts_and_evaluate_tools(run_dir, exported, tmp_path):
    output, _ = exported
    demo = run_dir.parent / "cache" / "demo"
    pruned = tmp_path / "code-25"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "select_experts.py"), "--hf", str(output),
                             "--output", str(pruned), "--keep-fraction", "0.25", "--demo-dir", str(demo),
                             "--domain", "code", "--max-tokens", "2000"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((pruned / "pruning_metadata.json").read_text())
    assert metadata["num_experts_kept"] == 4 and metadata["calibration"]["demo_domain"] == "code"
    report = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--hf", str(output), str(pruned),
                             "--demo-dir", str(demo), "--max-tokens", "1000", "--output", str(report)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(report.read_text())
    expected = {(n, d) for n in (16, 4) for d in ("code", "docs", "prose")}
    assert {(r["num_experts"], r["domain"]) for r in records} == expected
    assert all(1 < r["perplexity"] < 5000 and r["tokens"] > 0 for r in records)
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "select_experts.py"), "--hf", str(output), "--output",
                          str(tmp_path / "x"), "--keep", "1", "--demo-dir", str(demo), "--domain", "code"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "routed top-k" in bad.stderr


def test_emo_layout_export_imports_back_exactly(run_dir, tmp_path):
    emo = tmp_path / "emo"
    result = subprocess.run([sys.executable, str(TOOL), "--checkpoint", str(run_dir), "--output", str(emo),
                             "--layout", "emo"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((emo / "config.json").read_text())["model_type"] == "emo"
    init = tmp_path / "init"
    result = subprocess.run([sys.executable, str(FROM_HF), "--hf", str(emo), "--recipe", "tiny", "--output", str(init)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = _weights(init)
    tensors = _weights(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    assert set(imported) == set(tensors) and all(torch.equal(imported[k], tensors[k]) for k in tensors)
