"""The demo corpus, built once per test session: tokenizer and one indexed dataset per domain."""

import pytest

from megatron_emo.data.demo_corpus import demo_documents
from megatron_emo.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def demo_docs() -> dict[str, list[str]]:
    """The demo corpus's documents per domain (plain text)."""
    return demo_documents()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """The manifest of the demo data (tokenizer trained on all domains, 2048 pieces) built by
    megatron_emo.data.demo_data.prepare_demo_data into a session temporary directory."""
    from megatron_emo.data.demo_data import prepare_demo_data

    return prepare_demo_data(tmp_path_factory.mktemp("demo"), vocab_size=2048, progress=False)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_data) -> Tokenizer:
    return Tokenizer(demo_data["tokenizer"])
