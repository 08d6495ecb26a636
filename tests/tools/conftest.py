"""A tiny Hugging Face folder shared by the tests of the tools that read one."""

import pytest

TEXTS = {
    "code": ["def f(x):\n    return x * 2\n" * 6, "import os\nprint(os.getcwd())\n" * 5],
    "prose": ["The old man walked slowly to the river and sat down. " * 5, "It rained all night. " * 9],
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random 2-layer Qwen2-MoE (8 routed experts, top-2) with a small SentencePiece tokenizer."""
    # Imported here: they need transformers, which the other tool tests run without.
    from megatron_emo.convert.hf_tokenizer import export_tokenizer
    from megatron_emo.data.tokenizer import train_tokenizer
    from tests.analysis.test_usage import tiny_qwen2_moe

    root = tmp_path_factory.mktemp("analyze")
    tokenizer = train_tokenizer([t for texts in TEXTS.values() for t in texts], root / "tok.model", 300)
    export_tokenizer(tokenizer.model_file, root / "hf")
    tiny_qwen2_moe(vocab_size=300).save_pretrained(root / "hf")
    return root / "hf"
