"""The exported HF tokenizer encodes and decodes exactly as our SentencePiece model."""

import json

import pytest

pytest.importorskip("transformers")

import sentencepiece as spm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from megatron_emo.convert.hf_tokenizer import TokenizerExportError, check_tokenizer, export_tokenizer  # noqa: E402
from megatron_emo.data.demo_corpus import demo_documents  # noqa: E402
from megatron_emo.data.tokenizer import train_tokenizer  # noqa: E402

DOCS_PER_DOMAIN = 60


@pytest.fixture(scope="module")
def corpus():
    return demo_documents()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus):
    """A tokenizer trained as the demo corpus's is (train_tokenizer), exported to HF files."""
    root = tmp_path_factory.mktemp("tokenizer")
    sample = [doc for docs in corpus.values() for doc in docs[::4]]
    model = train_tokenizer(sample, root / "tokenizer.model", vocab_size=1000).model_file
    export_tokenizer(model, root / "hf")
    return model, root / "hf"


def test_demo_corpus_encodes_identically(exported, corpus):
    model, hf_dir = exported
    sp = spm.SentencePieceProcessor(model_file=str(model))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = [doc for docs in corpus.values() for doc in docs[:DOCS_PER_DOMAIN]]
    assert len(texts) == 3 * DOCS_PER_DOMAIN
    for text in texts:
        ids = sp.encode(text)
        assert hf(text)["input_ids"] == ids  # no BOS/EOS added, as in our training data
        assert hf.decode(ids) == sp.decode(ids) == text  # lossless both ways
    assert check_tokenizer(hf_dir, model, texts) == len(texts)


def test_special_ids_and_files(exported):
    model, hf_dir = exported
    sp = spm.SentencePieceProcessor(model_file=str(model))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id, hf.unk_token_id) == (
        sp.eos_id(), sp.pad_id(), sp.bos_id(), sp.unk_id()) == (3, 0, 2, 1)
    assert len(hf) == sp.get_piece_size() == 1000
    assert {p.name for p in hf_dir.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    # The cases the stock Llama conversion gets wrong: a leading space, and special tokens as text.
    for text in (" leading", "  def f():\n\treturn 1", "a </s> b <s>"):
        assert hf(text)["input_ids"] == sp.encode(text)


def test_refuses_a_whitespace_collapsing_tokenizer(tmp_path, corpus):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus["prose"][:50]), model_prefix=str(tmp_path / "nfkc"), vocab_size=300,
        model_type="bpe", normalization_rule_name="nmt_nfkc", minloglevel=2,
    )
    with pytest.raises(TokenizerExportError, match="remove_extra_whitespaces"):
        export_tokenizer(tmp_path / "nfkc.model", tmp_path / "hf")


def test_check_reports_a_mismatch(exported, tmp_path):
    model, hf_dir = exported
    other = train_tokenizer(
        ["something else entirely " * 40, "more text here"] * 20, tmp_path / "other.model", vocab_size=300
    )
    with pytest.raises(TokenizerExportError, match="tokens, sentencepiece has 300"):
        check_tokenizer(hf_dir, other.model_file, ["hello"])
