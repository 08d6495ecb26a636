from setuptools import find_packages, setup

setup(
    name="megatron_emo",
    version="0.1.0",
    description="EMO document-pooled mixture-of-experts training on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_emo", "megatron_emo.*"]),
    install_requires=[
        "torch>=2.6",
        # 0.17+ needs Python 3.12 and replaced the ModuleSpec layer specs we plug into.
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        # megatron-core's checkpoint writer needs it (and does not declare it).
        "psutil",
        "sentencepiece",
        "tensorboard",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # Hugging Face export/import (tools/convert_to_hf.py, megatron_emo.convert).
        "hf": ["transformers>=5", "safetensors"],
        # Expert analysis (tools/analyze_experts.py, examples/emo_effect): heat maps and plots.
        "analysis": ["transformers>=5", "safetensors", "matplotlib", "scipy"],
        # The throughput benchmark's chart (tools/benchmark_throughput.py).
        "bench": ["matplotlib"],
        # The test command: the suite and the linter (ruff.toml).
        "test": ["pytest", "ruff", "transformers>=5", "safetensors", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["emo-train=megatron_emo.train:main"]},
)
