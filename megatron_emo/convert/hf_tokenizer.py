"""Our SentencePiece model as Hugging Face tokenizer files that encode exactly as sentencepiece.

transformers' Llama converter (``LlamaTokenizer.from_pretrained(<dir with tokenizer.model>)``)
builds the BPE vocabulary, merges and byte fallback correctly, but its ``Metaspace``
pre-tokenizer only prepends the dummy "▁" when the text does not already start with a space,
while sentencepiece always prepends it: ``" lead"`` becomes ``▁▁le ad`` in sentencepiece and
``▁le ad`` in HF. And the Llama tokenizer class rebuilds that pre-tokenizer when it loads. So the
export replaces it with sentencepiece's exact rule (normalizer: prepend "▁", then every space →
"▁"; no pre-tokenizer) and names the generic fast tokenizer class (``PreTrainedTokenizerFast``,
``TokenizersBackend`` in transformers 5), which keeps ``tokenizer.json`` as written.
``split_special_tokens=True`` makes text such as ``"</s>"`` encode as characters, as
sentencepiece does. No BOS/EOS is added (megatron_emo's data has none but the EOS that ends
each document); ``generate`` stops at EOS.

Supported: megatron_emo's Llama-style models (BPE, byte fallback, identity normalisation, no
whitespace collapsing; :func:`megatron_emo.data.tokenizer.train_tokenizer`). Others are refused
with the reason, and :func:`check_tokenizer` compares ids and decoded text on sample texts.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

SAMPLE_TEXTS = (
    "Hello world. The quick brown fox jumps over the lazy dog.",
    "  def f(x):\n\treturn x ** 2  # indented, tabs\n\n\nclass A:\n    pass\n",
    " leading space, trailing spaces  ",
    "digits 1234567890 and 3.14159; unicode: ünïcödé — ✓ 日本語 🙂",
    "special tokens as text: </s> <s> <pad> <unk>",
    "",
    " ",
    "\n",
)
"""Texts that exercise the cases where a converted tokenizer tends to differ."""


class TokenizerExportError(ValueError):
    """A SentencePiece model the HF export cannot reproduce exactly, or a mismatch found."""


def _model_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def check_exportable(model_file: os.PathLike) -> None:
    """Raise TokenizerExportError if the model uses a feature the export does not reproduce."""
    proto = _model_proto(Path(model_file))
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != trainer.BPE:
        problems.append(f"model_type {trainer.ModelType.Name(trainer.model_type)} (only BPE is exported)")
    if spec.name not in ("identity", "") or spec.precompiled_charsmap:
        problems.append(f"normalization {spec.name!r} (only 'identity' is exported)")
    if spec.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=True (whitespace collapsing is not exported)")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=True")
    if problems:
        raise TokenizerExportError(
            f"tokenizer {model_file} cannot be exported exactly: " + "; ".join(problems)
            + ". megatron_emo's own tokenizers (train_tokenizer, tools/train_tokenizer) can."
        )


def export_tokenizer(
    model_file: os.PathLike, output_dir: os.PathLike, *, check_texts: Optional[Iterable[str]] = None
) -> dict:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (and a copy of ``tokenizer.model``).

    Checks the result against sentencepiece on :data:`SAMPLE_TEXTS` plus ``check_texts`` and
    returns ``{"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
    "checked_texts"}``.
    """
    import sentencepiece as spm
    from tokenizers import normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    model_file, output_dir = Path(model_file), Path(output_dir)
    if not model_file.is_file():
        raise FileNotFoundError(f"tokenizer model {model_file} does not exist")
    check_exportable(model_file)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = _model_proto(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        converted = LlamaTokenizer.from_pretrained(tmp)
    backend = converted.backend_tokenizer
    prefix = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None

    def piece(token_id: int) -> Optional[str]:
        return sp.id_to_piece(token_id) if token_id >= 0 else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        unk_token=piece(sp.unk_id()),
        pad_token=piece(sp.pad_id()),
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    # The generic class under its transformers 4.x name, which 5.x also resolves.
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy(model_file, output_dir / "tokenizer.model")
    texts = [*SAMPLE_TEXTS, *(check_texts or ())]
    check_tokenizer(output_dir, model_file, texts)
    return {
        "vocab_size": sp.get_piece_size(),
        "bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None,
        "eos_token_id": sp.eos_id(),
        "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None,
        "unk_token_id": sp.unk_id() if sp.unk_id() >= 0 else None,
        "checked_texts": len(texts),
    }


def check_tokenizer(hf_dir: os.PathLike, model_file: os.PathLike, texts: Iterable[str]) -> int:
    """Raise TokenizerExportError unless ``AutoTokenizer`` (stock) on ``hf_dir`` encodes every
    text to sentencepiece's ids and decodes them to sentencepiece's text; returns the count."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    if len(hf) != sp.get_piece_size():
        raise TokenizerExportError(f"{hf_dir}: {len(hf)} tokens, sentencepiece has {sp.get_piece_size()}")
    count = 0
    for count, text in enumerate(texts, 1):
        expected, got = sp.encode(text), hf(text)["input_ids"]
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            raise TokenizerExportError(
                f"{hf_dir} encodes text {count} differently from {model_file} at token {at}: "
                f"sentencepiece {sp.id_to_piece(expected[at:at + 4])} vs HF "
                f"{hf.convert_ids_to_tokens(got[at:at + 4])} (text starts {text[:60]!r})"
            )
        if hf.decode(got) != sp.decode(expected):
            raise TokenizerExportError(f"{hf_dir} decodes text {count} differently from {model_file} ({text[:60]!r})")
    return count
