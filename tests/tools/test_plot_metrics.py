"""tools/plot_metrics.py without matplotlib: one line naming the pip command, exit 2."""

import sys

import pytest

from tests.conftest import load_tool


def test_missing_matplotlib_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    module = load_tool("plot_metrics")  # loads: matplotlib is imported only to draw
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == 'error: this tool needs matplotlib, not installed: pip install -e ".[analysis]"\n'
