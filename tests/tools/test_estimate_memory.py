"""tools/estimate_memory.py's flags: refused up front with the flag named, exit 2."""

import pytest

from tools.estimate_memory import EXIT_BAD_INPUT, main


@pytest.mark.parametrize("flags, message", [
    (["--world-size", "0"], "argument --world-size: must be at least 1, got 0"),
    (["--world-size", "-8"], "argument --world-size: must be at least 1, got -8"),
    (["--world-size", "2", "--vocab-size", "0"], "argument --vocab-size: must be at least 1, got 0"),
    (["--world-size", "2", "--gpu-memory-gib", "-1"], "argument --gpu-memory-gib: must be a finite number of GiB"),
    (["--world-size", "2", "--gpu-memory-gib", "inf"], "argument --gpu-memory-gib: must be a finite number of GiB"),
    (["--world-size", "2", "--reserve-gib", "nan"], "argument --reserve-gib: must be a finite number of GiB"),
    (["--world-size", "2", "--reserve-gib", "80"], "--reserve-gib 80 leaves nothing of --gpu-memory-gib 80"),
    (["--world-size", "2", "--gpu-memory-gib", "0", "--reserve-gib", "0"], "leaves nothing of --gpu-memory-gib 0"),
])
def test_nonsensical_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", "tiny", *flags])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_a_tokenizer_that_is_not_sentencepiece_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_text("not a tokenizer")
    tokenizer = f"data.tokenizer_model={str(bad)!r}"
    assert main(["--recipe", "tiny", "--world-size", "2", "--set", tokenizer]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.model is not a SentencePiece model" in err
    assert len(err.splitlines()) == 1
