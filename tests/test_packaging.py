"""The repository root is on ``sys.path`` whenever code runs from it (``python -m pytest``,
``python -m megatron_emo.train``, a notebook): none of its folders may take the import name of
another distribution's package, or that package breaks (transformers imports the PyPI
``kernels`` package to build its model classes)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_transformers_model_classes_import_from_the_repository_root():
    code = "import transformers; transformers.Qwen2MoeForCausalLM; transformers.AutoModelForCausalLM"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_top_level_name_of_the_repository_is_another_distributions():
    ours = {path.stem for path in REPO_ROOT.iterdir()
            if (path / "__init__.py").is_file() or (path.suffix == ".py" and path.name != "setup.py")}
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in ours if set(installed.get(name, ())) - {"megatron_emo"}}
    assert not clashes, f"top-level names of the repository that installed distributions also provide: {clashes}"
