"""tools/analyze_experts.py on a tiny Hugging Face folder: matrices that add up, files, errors."""

import json
import sys

import pytest

pytest.importorskip("transformers")

from tests.conftest import load_tool  # noqa: E402
from tests.tools.conftest import TEXTS  # noqa: E402


def _main(argv):
    return load_tool("analyze_experts").main(argv)


def test_usage_rows_sum_to_top_k_times_the_tokens(hf_dir, tmp_path):
    files = []
    for domain, texts in TEXTS.items():
        path = tmp_path / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        files.append(f"--text={domain}={path}")
    assert _main(["--model", str(hf_dir), *files, "--seq-length", "32", "--output", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "experts.json").read_text())
    assert summary["domains"] == ["code", "prose"] and summary["top_k"] == 2
    assert summary["documents"] == {"code": 2, "prose": 2}
    for layer in summary["layers"]:
        for domain, row in zip(summary["domains"], layer["selections"]):
            assert sum(row) == 2 * summary["tokens"][domain] > 0
        assert all(len(experts) == 2 for experts in layer["top_experts"].values())  # 25% of 8
    assert 0 <= summary["mutual_information_bits_mean"] <= summary["mutual_information_max_bits"] == 1.0
    assert (tmp_path / "out" / "experts.png").stat().st_size > 0


def test_bad_inputs_exit_2(hf_dir, tmp_path, capsys):
    assert _main(["--model", str(hf_dir), "--output", str(tmp_path / "out")]) == 2
    assert "--demo-dir or --text" in capsys.readouterr().err
    assert _main(["--model", str(hf_dir), "--text", "code", "--output", str(tmp_path / "out")]) == 2
    assert "NAME=FILES" in capsys.readouterr().err


def test_a_model_that_does_not_exist_is_named_in_one_line(tmp_path, capsys):
    text = tmp_path / "code.py"
    text.write_text(TEXTS["code"][0])
    assert _main(["--model", str(tmp_path / "nosuch"), "--text", f"code={text}",
                  "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: --model {tmp_path / 'nosuch'} does not exist\n"


@pytest.mark.parametrize("package", ["scipy", "matplotlib"])
def test_a_missing_package_names_the_pip_command(package, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        _main(["--model", "hf", "--text", "code=a.py", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f'error: this tool needs {package}, not installed: pip install -e ".[analysis]"\n'
