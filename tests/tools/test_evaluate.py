"""tools/evaluate.py: folders checked before any work, a log line per model and domain, a
missing package named with its pip command."""

import json
import logging
import sys

import pytest

pytest.importorskip("transformers")

from tests.conftest import load_tool  # noqa: E402
from tests.tools.conftest import TEXTS  # noqa: E402


def _main(argv):
    return load_tool("evaluate").main(argv)


@pytest.fixture
def text_flags(tmp_path):
    """``--text DOMAIN=FILE`` for each domain of :data:`TEXTS`."""
    flags = []
    for domain, texts in TEXTS.items():
        path = tmp_path / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        flags.append(f"--text={domain}={path}")
    return flags


def test_a_line_per_model_and_domain(hf_dir, text_flags, caplog, capsys):
    with caplog.at_level(logging.INFO):
        assert _main(["--hf", str(hf_dir), *text_flags, "--seq-length", "32"]) == 0
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("evaluating")]
    assert [line.rsplit(":", 1)[0] for line in lines] == [f"evaluating {hf_dir} on {domain}" for domain in TEXTS]
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["nosuch", "runs/tiny/nosuch"])
def test_a_folder_that_does_not_exist_is_named_before_any_work(name, hf_dir, text_flags, caplog, capsys,
                                                                monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a relative name, as a user types it
    with caplog.at_level(logging.INFO):
        assert _main(["--hf", str(hf_dir), name, *text_flags]) == 2
    assert capsys.readouterr().err == f"error: Hugging Face folder {name} does not exist\n"
    assert not [record for record in caplog.records if record.getMessage().startswith("evaluating")]


def test_a_folder_without_config_json_is_not_a_hugging_face_folder(tmp_path, text_flags, capsys):
    assert _main(["--hf", str(tmp_path), *text_flags]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is not a Hugging Face folder (no config.json): export one "
                                       "with tools/convert_to_hf.py\n")


def test_missing_transformers_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        _main(["--hf", "hf", "--text", "code=a.py"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'error: this tool needs transformers, not installed: pip install -e ".[hf]"\n'
