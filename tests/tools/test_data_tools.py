"""The data command-line tools (tools/train_tokenizer.py, tools/preprocess_data.py,
tools/prepare_demo_data.py) in their own processes: exit codes, summaries, errors.

Each tool process spends seconds importing megatron-core, so the module starts the processes
all at once (on small inputs) and each test checks its own; the further error cases call the
tools' ``main`` in this process.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_emo.data.demo_corpus import DOMAINS, docs_documents
from megatron_emo.data.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import load_tool

TOOLS = Path(__file__).resolve().parents[2] / "tools"
DOCS = 80


class Runs:
    """Tool processes started together; ``result(name)`` waits for one."""

    def __init__(self, root: Path):
        self.root = root
        self._procs, self._results = {}, {}

    def start(self, name: str, tool: str, *args):
        out, err = open(self.root / f"{name}.out", "w"), open(self.root / f"{name}.err", "w")
        self._procs[name] = (subprocess.Popen([sys.executable, str(TOOLS / tool), *map(str, args)],
                                              stdout=out, stderr=err, cwd=self.root), out, err)

    def result(self, name: str) -> subprocess.CompletedProcess:
        if name not in self._results:
            proc, out, err = self._procs[name]
            proc.wait(timeout=300)
            out.close(), err.close()
            self._results[name] = subprocess.CompletedProcess(
                proc.args, proc.returncode, (self.root / f"{name}.out").read_text(),
                (self.root / f"{name}.err").read_text())
        return self._results[name]

    def stop(self):
        for proc, out, err in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close(), err.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    lines = [json.dumps({"text": doc}) for doc in docs_documents()[:DOCS]]
    lines.insert(10, json.dumps({"text": ""}))  # line 11: empty, skipped
    lines.insert(20, '{"text": "broken')  # line 21: malformed, skipped
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (root / "notes.txt").write_text("A plain-text file is one document.\n    def indented():\n        pass\n")
    (root / "bad.jsonl").write_text('{"text": "good"}\n{"text": "broken\n{"text": "good again"}\n')
    train_tokenizer(docs_documents()[:DOCS], root / "tok.model", vocab_size=512)

    runs = Runs(root)
    runs.start("demo", "prepare_demo_data.py", "--output-dir", root / "demo", "--vocab-size", 1024, "--workers", 2)
    runs.start("tokenizer", "train_tokenizer.py", "--input", root / "corpus.jsonl", root / "notes.txt",
               "--vocab-size", 600, "--output", root / "trained" / "tok.model")
    for workers in (1, 2):
        runs.start(f"preprocess{workers}", "preprocess_data.py", "--input", root / "corpus.jsonl", root / "notes.txt",
                   "--tokenizer-model", root / "tok.model", "--output-prefix", root / f"w{workers}" / "data",
                   "--workers", workers, "--no-progress")
    runs.start("preprocess_strict", "preprocess_data.py", "--input", root / "bad.jsonl", "--strict", "--no-progress",
               "--tokenizer-model", root / "tok.model", "--output-prefix", root / "strict" / "data")
    try:
        yield runs
    finally:
        runs.stop()


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def test_train_tokenizer(runs):
    result = runs.result("tokenizer")
    assert result.returncode == 0, result.stderr[-3000:]
    model = runs.root / "trained" / "tok.model"
    assert result.stdout.strip() == (f"wrote {model}: 600 pieces, EOS 3, trained on {DOCS + 1} documents "
                                     "(skipped 1 empty, 1 invalid)")
    assert "corpus.jsonl:21: malformed JSON" in result.stderr  # the skipped line is reported
    tokenizer = Tokenizer(model)
    assert tokenizer.vocab_size == 600 and tokenizer.eos_id == 3
    text = "    def indented():\n        pass\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert files_under(runs.root / "trained") == ["tok.model"]  # no temporary files left


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_data(runs, workers):
    result = runs.result(f"preprocess{workers}")
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = runs.root / f"w{workers}" / "data"
    sidecar = json.loads(prefix.with_suffix(".json").read_text())
    assert sidecar["documents"] == DOCS + 1  # the JSONL records and the .txt file
    summary = re.fullmatch(
        rf"wrote {re.escape(str(prefix))}\.bin/\.idx: (\d+) documents, (\d+) tokens, .*; "
        r"skipped (\d+) empty and (\d+) invalid",
        result.stdout.splitlines()[0],
    )
    assert summary, result.stdout
    assert [int(n) for n in summary.groups()] == [DOCS + 1, sidecar["tokens"], 1, 1]
    assert result.stdout.splitlines()[1].startswith(f"  skipped {runs.root / 'corpus.jsonl'}:21: malformed JSON")
    assert files_under(prefix.parent) == ["data.bin", "data.idx", "data.json"]
    dataset = IndexedDataset(str(prefix))
    tokenizer = Tokenizer(runs.root / "tok.model")
    assert tokenizer.decode(dataset[DOCS].tolist()[:-1]) == (runs.root / "notes.txt").read_text()


def test_preprocess_data_workers_agree(runs):
    for workers in (1, 2):
        assert runs.result(f"preprocess{workers}").returncode == 0
    for ext in ("bin", "idx", "json"):
        one, two = (runs.root / f"w{w}" / f"data.{ext}" for w in (1, 2))
        assert one.read_bytes() == two.read_bytes(), ext


def test_strict_bad_line_exits_2_and_writes_nothing(runs):
    result = runs.result("preprocess_strict")
    assert result.returncode == 2, (result.stdout, result.stderr[-3000:])
    assert f"error: {runs.root / 'bad.jsonl'}:2: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr
    assert files_under(runs.root / "strict") == []


def tool_main(name: str):
    """``main`` of tools/<name>.py, loaded in this process."""
    return load_tool(name).main


def test_train_tokenizer_strict_bad_line(runs, tmp_path, capsys):
    code = tool_main("train_tokenizer")(["--input", str(runs.root / "bad.jsonl"), "--strict", "--vocab-size", "300",
                                         "--output", str(tmp_path / "out" / "tok.model")])
    assert code == 2
    assert f"error: {runs.root / 'bad.jsonl'}:2: malformed JSON" in capsys.readouterr().err
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("tool", ["preprocess_data", "train_tokenizer"])
def test_missing_input_exits_2(runs, tmp_path, capsys, tool):
    missing = tmp_path / "missing.jsonl"
    inputs = ["--input", str(runs.root / "corpus.jsonl"), str(missing)]
    if tool == "preprocess_data":
        args = [*inputs, "--tokenizer-model", str(runs.root / "tok.model"),
                "--output-prefix", str(tmp_path / "out" / "data"), "--no-progress"]
    else:
        args = [*inputs, "--vocab-size", "512", "--output", str(tmp_path / "out" / "tok.model")]
    assert tool_main(tool)(args) == 2
    assert f"error: input {missing} does not exist" in capsys.readouterr().err
    assert not list(tmp_path.glob("out/*"))


def test_preprocess_data_missing_tokenizer_exits_2(runs, tmp_path, capsys):
    code = tool_main("preprocess_data")(["--input", str(runs.root / "notes.txt"), "--tokenizer-model",
                                         str(tmp_path / "nope.model"), "--output-prefix", str(tmp_path / "data"),
                                         "--no-progress"])
    assert code == 2
    assert f"error: tokenizer model {tmp_path / 'nope.model'} does not exist" in capsys.readouterr().err
    assert files_under(tmp_path) == []


def test_train_tokenizer_without_documents_exits_2(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    code = tool_main("train_tokenizer")(["--input", str(tmp_path / "empty.jsonl"), "--vocab-size", "300",
                                         "--output", str(tmp_path / "tok.model")])
    assert code == 2
    assert "error: no documents in the inputs" in capsys.readouterr().err
    assert files_under(tmp_path) == ["empty.jsonl"]


def test_prepare_demo_data(runs, monkeypatch):
    result = runs.result("demo")
    assert result.returncode == 0, result.stderr[-3000:]
    demo = runs.root / "demo"
    manifest = json.loads((demo / "demo.json").read_text())
    lines = result.stdout.splitlines()
    assert lines[0] == f"tokenizer {demo / 'tokenizer.model'}: 1024 pieces, EOS 3"
    assert [line.split()[0] for line in lines[1:]] == list(DOMAINS)
    for line, domain in zip(lines[1:], DOMAINS):
        entry = manifest["domains"][domain]
        sidecar = json.loads((demo / f"{domain}.json").read_text())
        assert f"{entry['documents']:5d} documents {entry['tokens']:8d} tokens" in line
        assert (entry["documents"], entry["tokens"]) == (sidecar["documents"], sidecar["tokens"])
        assert entry["documents"] >= 50 and entry["prefix"] == str(demo / domain)
    assert files_under(demo) == sorted(
        ["demo.json", "text", "tokenizer.model"]
        + [f"{domain}.{ext}" for domain in DOMAINS for ext in ("bin", "idx", "json")]
        + [f"text/{domain}.jsonl" for domain in DOMAINS]
    )
    # a second call reuses the directory: it trains and tokenizes nothing
    from megatron_emo.data import demo_data

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a complete demo directory")

    monkeypatch.setattr(demo_data, "train_tokenizer", fail)
    monkeypatch.setattr(demo_data, "preprocess", fail)
    assert demo_data.prepare_demo_data(demo, vocab_size=1024, progress=False) == manifest
