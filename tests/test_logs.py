import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_emo import logs

ROOT = Path(__file__).resolve().parents[1]
TOOL_LIKE = """
import logging, sys, tempfile
import numpy, torch
from megatron_emo.logs import configure_cli_logging
configure_cli_logging(verbose=sys.argv[1] == "verbose")  # before megatron-core is imported, as the tools
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from tests.conftest import make_config

logging.getLogger("megatron_emo.training.loop").info("our own INFO line")
logging.getLogger("megatron.core.datasets.gpt_dataset").warning("a megatron-core warning")
# What megatron-core logs at WARNING for each of our one-dataset validation sets.
logging.getLogger("megatron.core.datasets.blended_dataset").warning(
    "Building a BlendedDataset for a single MegatronDataset")
with tempfile.TemporaryDirectory() as tmp:
    builder = IndexedDatasetBuilder(f"{tmp}/d.bin", dtype=numpy.int32)
    builder.add_document(torch.tensor([1, 2, 3]), [3])
    builder.finalize(f"{tmp}/d.idx")
    IndexedDataset(f"{tmp}/d")  # megatron-core logs reading the index at INFO
make_config(num_moe_experts=33)  # 32 routed experts: megatron-core's fp32-routing warning
"""
MEGATRON_CHATTER = ("Load the _IndexReader", "total number of documents", "Megatron-FSDP", "fp32 routing",
                    "BlendedDataset for a single")
"""megatron-core's dataset INFO lines, its Megatron-FSDP notices and its warnings that do not
apply to us."""


def test_log_once(monkeypatch, caplog):
    monkeypatch.setattr(logs, "_logged_once", set())
    logger = logging.getLogger("megatron_emo.test")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            logs.log_once(logger, "path = %s", "a")
        logs.log_once(logger, "path = %s", "b")
    assert [r.getMessage() for r in caplog.records] == ["path = a", "path = b"]


@pytest.fixture(scope="module")
def stderr_by_mode():
    """What a tool-like process prints on stderr, by default and verbose (a process each:
    logging is configured once per process)."""
    def run(mode):
        result = subprocess.run([sys.executable, "-c", TOOL_LIKE, mode], capture_output=True, text=True,
                                timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    return {mode: run(mode) for mode in ("default", "verbose")}


@pytest.mark.parametrize("mode", ["default", "verbose"])
def test_megatron_chatter_only_when_verbose(stderr_by_mode, mode):
    err = stderr_by_mode[mode]
    assert "our own INFO line" in err and "a megatron-core warning" in err
    for chatter in MEGATRON_CHATTER:
        assert (chatter in err) == (mode == "verbose"), (chatter, err)


def test_verbose_argument():
    parser = argparse.ArgumentParser()
    logs.add_verbose_argument(parser)
    assert not parser.parse_args([]).verbose
    assert parser.parse_args(["-v"]).verbose and parser.parse_args(["--verbose"]).verbose
