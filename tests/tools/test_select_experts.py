"""tools/select_experts.py's bad inputs: named at once, exit 2."""

import sys

import pytest

from megatron_emo.data.demo_corpus import DOMAINS
from tests.conftest import load_tool


def _main(argv):
    return load_tool("select_experts").main(argv)


def test_an_unknown_domain_lists_the_demo_domains(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(["--hf", "hf", "--output", str(tmp_path / "out"), "--keep", "4", "--demo-dir", "demo",
               "--domain", "nosuch"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --domain: invalid choice: 'nosuch' (choose from " in err
    assert all(domain in err.rsplit("choose from", 1)[1] for domain in DOMAINS)


def test_a_folder_that_does_not_exist_is_named(tmp_path, capsys):
    pytest.importorskip("transformers")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("def f(x):\n    return x\n")
    assert _main(["--hf", str(tmp_path / "nosuch"), "--output", str(tmp_path / "out"), "--keep", "4",
                  "--calibration", str(calibration)]) == 2
    assert capsys.readouterr().err == f"error: Hugging Face folder {tmp_path / 'nosuch'} does not exist\n"


def test_missing_safetensors_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        _main(["--hf", "hf", "--output", str(tmp_path / "out"), "--keep", "4", "--calibration", "a.txt"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'error: this tool needs safetensors, not installed: pip install -e ".[hf]"\n'
