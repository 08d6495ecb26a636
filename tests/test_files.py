"""Folders published whole."""

from pathlib import Path

import pytest

from megatron_emo import files


def _folders(tmp_path):
    output, new = tmp_path / "hf", tmp_path / ".tmp-hf"
    for folder in (output, new):
        folder.mkdir()
        (folder / "config.json").write_text(folder.name)
    return output, new


def test_the_new_folder_takes_the_place_of_the_earlier_one(tmp_path):
    output, new = _folders(tmp_path)
    files.replace_folder(new, output)
    assert (output / "config.json").read_text() == ".tmp-hf" and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_the_earlier_folder_is_put_back_if_the_rename_fails(tmp_path, monkeypatch):
    output, new = _folders(tmp_path)
    rename = files.os.replace

    def replace(source, target):
        if Path(source) == new:
            raise OSError("no space left")
        rename(source, target)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="no space left"):
        files.replace_folder(new, output)
    assert (output / "config.json").read_text() == "hf" and not list(tmp_path.glob(".old-*"))
