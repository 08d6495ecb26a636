import json
import shutil

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


@pytest.mark.parametrize(
    "vocab, multiple, tp, expected",
    [(2048, 64, 1, 2048), (2049, 64, 1, 2112), (100278, 128, 1, 100352), (100, 64, 2, 128)],
)
def test_padded_vocab_size(vocab, multiple, tp, expected):
    assert padded_vocab_size(vocab, multiple, tp) == expected


# --- the tokenizer trained on the demo corpus ---------------------------------------------------


def test_lossless_on_every_demo_document(demo_tokenizer, demo_docs):
    for domain, documents in demo_docs.items():
        for i, doc in enumerate(documents):
            ids = demo_tokenizer.encode(doc)
            assert demo_tokenizer.eos_id not in ids, (domain, i)  # EOS only between documents
            assert demo_tokenizer.decode(ids) == doc, (domain, i)
    # the code domain exercises indentation and runs of spaces, the prose and docs unicode
    assert any("\n        " in doc for doc in demo_docs["code"])


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    if x:\n\treturn  x   # two, then three spaces\n",
        "  leading spaces and trailing spaces  ",
        " one leading space",
        "\n\nblank lines first\n\n\n",
        "ünïcödé — Natsume Sōseki 夏目漱石 🎉 e\u0301 \u00a0nbsp",
        "\r\n\x00\x7f control characters",
        "0123456789 digits 3.14159e-10",
    ],
)
def test_lossless_on_hard_text(demo_tokenizer, text):
    assert demo_tokenizer.decode(demo_tokenizer.encode(text)) == text


@pytest.mark.xfail(strict=True, reason="SentencePiece maps U+2581 '▁' (its space meta-symbol) to a space on decode")
def test_lossless_on_the_sentencepiece_space_symbol(demo_tokenizer):
    text = "sparkline ▁▂▃"
    assert demo_tokenizer.decode(demo_tokenizer.encode(text)) == text


def test_megatron_attributes(demo_tokenizer, demo_data, tmp_path):
    tokenizer = demo_tokenizer
    assert tokenizer.vocab_size == demo_data["vocab_size"] == 2048
    assert tokenizer.eod == tokenizer.eos_id == demo_data["eos_id"] == 3
    assert tokenizer.pad == tokenizer.pad_id == 0
    ids = tokenizer.unique_identifiers
    assert ids == Tokenizer(tokenizer.model_file).unique_identifiers  # a content hash, not the path
    json.dumps(ids)  # megatron-core writes it into its cache description
    copy = shutil.copy(tokenizer.model_file, tmp_path / "copy.model")
    assert Tokenizer(copy).unique_identifiers == ids
    other = train_tokenizer(python_docs()[:100], tmp_path / "other.model", vocab_size=400)
    assert other.unique_identifiers != ids


# --- files that are not a usable tokenizer: a DatasetError, which every command line reports -----


def test_a_file_that_is_not_sentencepiece_is_refused_by_name(tmp_path):
    from megatron_emo.data.indexed import DatasetError

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(DatasetError, match="tokenizer.json is not a SentencePiece model"):
        Tokenizer(bad)


def test_a_tokenizer_without_eos_is_refused_by_name(tmp_path):
    import sentencepiece as spm

    from megatron_emo.data.indexed import DatasetError

    spm.SentencePieceTrainer.train(sentence_iterator=iter(python_docs()[:20]), model_prefix=str(tmp_path / "no_eos"),
                                   vocab_size=100, eos_id=-1, minloglevel=2)
    with pytest.raises(DatasetError, match="no_eos.model has no EOS token"):
        Tokenizer(tmp_path / "no_eos.model")


def test_train_reports_a_bad_tokenizer_in_one_line(tmp_path, capsys):
    from megatron_emo.train import EXIT_BAD_INPUT, main

    bad = tmp_path / "bad.model"
    bad.write_text("not a tokenizer")
    assert main(["--recipe", "tiny", "--set", f"data.tokenizer_model={str(bad)!r}",
                 "--set", f"data.blend=[[1.0,{str(tmp_path / 'data')!r}]]",
                 "--set", f"train.output_dir={str(tmp_path / 'run')!r}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tokenizer model") and "bad.model is not a SentencePiece model" in err
    assert len(err.splitlines()) == 1
