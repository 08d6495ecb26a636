import pytest

from megatron_emo.data.demo_corpus import docs_documents as python_docs
from megatron_emo.data.tokenizer import Tokenizer, padded_vocab_size, train_tokenizer


def test_python_docs_is_deterministic_real_text():
    docs = python_docs()
    assert len(docs) > 300 and docs == python_docs()
    assert all(len(doc) >= 200 for doc in docs)
    assert any("Return" in doc for doc in docs)


def test_train_load_roundtrip(tmp_path):
    docs = python_docs()[:100]
    tokenizer = train_tokenizer(docs, tmp_path / "tok.model", vocab_size=400)
    assert tokenizer.vocab_size == 400 and tokenizer.eos_id == 3 and tokenizer.pad_id == 0
    text = "Return the number of items — ünïcode too ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte fallback: nothing unknown
    reloaded = Tokenizer(tmp_path / "tok.model")
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert not [p for p in tmp_path.iterdir() if p.name != "tok.model"]  # no temp files left


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("vocab, multiple, tp, expected", [(2048, 64, 1, 2048), (2049, 64, 1, 2112), (100278, 128, 1, 100352), (100, 64, 2, 128)])
def test_padded_vocab_size(vocab, multiple, tp, expected):
    assert padded_vocab_size(vocab, multiple, tp) == expected
