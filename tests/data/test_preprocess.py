"""Text → Megatron indexed dataset (megatron_emo.data.preprocess): round trips, document
boundaries, bad input lines, workers, atomic output."""

import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_emo.data.demo_corpus import DOMAINS
from megatron_emo.data.inputs import InputError
from megatron_emo.data.preprocess import preprocess

BAD_LINES = {
    "utf8": (b'{"text": "caf\xe9 au lait"}', "not UTF-8"),
    "json": (b'{"text": "no closing brace"', "malformed JSON"),
    "key": (b'{"body": "the text is under another key"}', "no string under key 'text'"),
    "type": (b'{"text": ["not", "a", "string"]}', "no string under key 'text'"),
    "array": (b'["a JSON array, not an object"]', "no string under key 'text'"),
}


def jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: text}) + "\n" for text in texts), encoding="utf-8")
    return path


def sequences(prefix):
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def files(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("domain", DOMAINS)
def test_demo_domain_round_trip(demo_data, demo_docs, demo_tokenizer, domain):
    """The whole demo corpus went text → .bin/.idx: tokens → text gives every document back, and
    EOS sits exactly at each document's end."""
    documents = demo_docs[domain]
    prefix = demo_data["domains"][domain]["prefix"]
    eos = demo_tokenizer.eos_id
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(documents) == demo_data["domains"][domain]["documents"]
    for i, doc in enumerate(documents):
        tokens = dataset[i]
        assert tokens[-1] == eos and eos not in tokens[:-1], (domain, i)
        assert demo_tokenizer.decode(tokens[:-1].tolist()) == doc, (domain, i)
    # the packed token stream of the .bin: EOS exactly at the cumulative document ends
    stream = np.fromfile(f"{prefix}.bin", dtype=dataset.index.dtype)
    assert len(stream) == demo_data["domains"][domain]["tokens"]
    ends = np.cumsum(dataset.sequence_lengths) - 1
    assert np.array_equal(np.flatnonzero(stream == eos), ends)
    assert demo_data["domains"][domain]["bytes"] == sum(len(doc.encode("utf-8")) for doc in documents)


@pytest.mark.parametrize("domain", DOMAINS)
def test_round_trip_of_a_subset(tmp_path, demo_docs, demo_tokenizer, domain):
    documents = demo_docs[domain][:15]
    info, summary = preprocess([jsonl(tmp_path / "in.jsonl", documents)], tmp_path / "out",
                               demo_tokenizer.model_file, progress=False)
    got = sequences(tmp_path / "out")
    assert got == [demo_tokenizer.encode(doc) + [demo_tokenizer.eos_id] for doc in documents]
    assert [demo_tokenizer.decode(seq[:-1]) for seq in got] == documents
    assert (summary.documents, summary.tokens) == (info.documents, info.tokens) == (15, sum(map(len, got)))
    assert summary.bytes == sum(len(doc.encode("utf-8")) for doc in documents)
    assert (summary.skipped_empty, summary.skipped_invalid, summary.problems) == (0, 0, [])
    assert "15 documents" in summary.report() and "skipped 0 empty and 0 invalid" in summary.report()


def test_text_and_jsonl_inputs_in_order(tmp_path, demo_tokenizer):
    book = "A plain-text file is one document.\n\n    Indented, with  two spaces.\n"
    (tmp_path / "book.txt").write_text(book, encoding="utf-8")
    jsonl(tmp_path / "a.jsonl", ["first json", "second — ünïcode"], key="body")
    jsonl(tmp_path / "b.json", ["third, from a .json file"], key="body")
    inputs = [tmp_path / "a.jsonl", tmp_path / "book.txt", tmp_path / "b.json"]
    info, summary = preprocess(inputs, tmp_path / "out", demo_tokenizer.model_file, text_key="body", progress=False)
    texts = [demo_tokenizer.decode(seq[:-1]) for seq in sequences(tmp_path / "out")]
    assert texts == ["first json", "second — ünïcode", book, "third, from a .json file"]
    assert info.documents == summary.documents == 4 and summary.skipped_invalid == 0


def test_empty_documents_are_skipped_and_counted(tmp_path, demo_tokenizer):
    jsonl(tmp_path / "in.jsonl", ["one", "", "two", "  \n\t ", "three"])
    with open(tmp_path / "in.jsonl", "a") as out:
        out.write("\n   \n")  # blank lines are not records
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    info, summary = preprocess([tmp_path / "in.jsonl", tmp_path / "empty.txt", tmp_path / "blank.txt"],
                               tmp_path / "out", demo_tokenizer.model_file, progress=False)
    assert [demo_tokenizer.decode(seq[:-1]) for seq in sequences(tmp_path / "out")] == ["one", "two", "three"]
    assert (summary.documents, summary.skipped_empty, summary.skipped_invalid) == (3, 4, 0)
    assert "skipped 4 empty and 0 invalid" in summary.report()


def _input_with_bad_lines(path, kinds):
    """Good records around one bad line per kind; returns the bad lines' numbers."""
    lines, numbers = [json.dumps({"text": "good 0"}).encode()], {}
    for n, kind in enumerate(kinds, start=1):
        lines.append(BAD_LINES[kind][0])
        numbers[kind] = len(lines)
        lines.append(json.dumps({"text": f"good {n}"}).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return numbers


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_lines_are_reported_with_file_and_line_and_skipped(tmp_path, demo_tokenizer, workers):
    source = tmp_path / "in.jsonl"
    numbers = _input_with_bad_lines(source, list(BAD_LINES))
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))
    info, summary = preprocess([source, tmp_path / "latin1.txt"], tmp_path / "out", demo_tokenizer.model_file,
                               workers=workers, progress=False)
    texts = [demo_tokenizer.decode(seq[:-1]) for seq in sequences(tmp_path / "out")]
    assert texts == [f"good {n}" for n in range(len(BAD_LINES) + 1)]
    assert summary.skipped_invalid == len(BAD_LINES) + 1 and summary.skipped_empty == 0
    expected = [f"{source}:{numbers[kind]}: {BAD_LINES[kind][1]}" for kind in BAD_LINES]
    expected.append(f"{tmp_path / 'latin1.txt'}: not UTF-8")
    assert len(summary.problems) == len(expected)
    for problem, start in zip(summary.problems, expected):
        assert problem.startswith(start), (problem, start)
    assert f"skipped 0 empty and {len(BAD_LINES) + 1} invalid" in summary.report()


@pytest.mark.parametrize("kind, workers", [(kind, 1) for kind in BAD_LINES] + [("json", 2), ("utf8", 2)])
def test_strict_stops_at_a_bad_line_and_writes_nothing(tmp_path, demo_tokenizer, kind, workers):
    source = tmp_path / "in.jsonl"
    _input_with_bad_lines(source, [kind])  # line 2
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as error:
        preprocess([source], out / "data", demo_tokenizer.model_file, workers=workers, strict=True, progress=False)
    assert str(error.value).startswith(f"{source}:2: {BAD_LINES[kind][1]}")
    assert files(out) == []  # neither a dataset nor temporary files


def test_strict_error_keeps_an_existing_dataset(tmp_path, demo_tokenizer):
    prefix = tmp_path / "data"
    preprocess([jsonl(tmp_path / "old.jsonl", ["the old dataset"])], prefix, demo_tokenizer.model_file, progress=False)
    before = {ext: (tmp_path / f"data.{ext}").read_bytes() for ext in ("bin", "idx", "json")}
    source = tmp_path / "new.jsonl"
    _input_with_bad_lines(source, ["utf8"])
    with pytest.raises(InputError, match=f"{source}:2: not UTF-8"):
        preprocess([source], prefix, demo_tokenizer.model_file, strict=True, progress=False)
    assert {ext: (tmp_path / f"data.{ext}").read_bytes() for ext in ("bin", "idx", "json")} == before
    assert files(tmp_path) == ["data.bin", "data.idx", "data.json", "new.jsonl", "old.jsonl"]
    assert [demo_tokenizer.decode(seq[:-1]) for seq in sequences(prefix)] == ["the old dataset"]


def test_two_workers_write_the_same_bytes_as_one(tmp_path, demo_docs, demo_tokenizer):
    # more documents than the pool's chunk size (64), from all domains, and a bad line and an
    # empty document in between
    texts = [doc[:300] for domain in DOMAINS for doc in demo_docs[domain][:50]]
    texts[70] = ""
    source = jsonl(tmp_path / "in.jsonl", texts)
    with open(source, "ab") as out:
        out.write(b"{broken\n" + json.dumps({"text": "after the broken line"}).encode() + b"\n")
    results = {}
    for workers in (1, 2):
        info, summary = preprocess([source], tmp_path / f"w{workers}", demo_tokenizer.model_file,
                                   workers=workers, progress=False)
        results[workers] = (info, summary.documents, summary.tokens, summary.bytes,
                            summary.skipped_empty, summary.skipped_invalid, summary.problems)
    assert results[1] == results[2]
    assert results[1][1] == len(texts)  # 149 non-empty + the line after the broken one
    for ext in ("bin", "idx", "json"):
        assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"w2.{ext}").read_bytes(), ext


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_input_file(tmp_path, demo_tokenizer, workers):
    good = jsonl(tmp_path / "good.jsonl", ["some text"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        preprocess([good, tmp_path / "missing.jsonl"], tmp_path / "out" / "data", demo_tokenizer.model_file,
                   workers=workers, progress=False)
    assert not list(tmp_path.glob("out/*"))


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        preprocess([jsonl(tmp_path / "in.jsonl", ["text"])], tmp_path / "out", tmp_path / "nope.model", progress=False)
    assert not list(tmp_path.glob("out*"))


def test_inputs_without_any_document_write_nothing(tmp_path, demo_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(InputError, match="no documents"):
        preprocess([empty], tmp_path / "out", demo_tokenizer.model_file, progress=False)
    assert not list(tmp_path.glob("out*"))
