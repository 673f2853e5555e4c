"""Preprocess contracts: datasets equal the tokenizer's own encoding, worker-count independent,
stable split, unigram entropy, and the two CLI entry points."""
from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter

import pytest

from megaloop.data.cli import preprocess_main, tokenizer_main
from megaloop.data.errors import DatasetError
from megaloop.data.indexed import IndexedDataset
from megaloop.data.preprocess import preprocess, unigram_entropy
from megaloop.data.tokenizer import Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_docs(path: str) -> list[str]:
    """Independent reader of the documented formats (form-feed lines / JSON lines)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    if ".jsonl" in path:
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    return [d for d in raw.split("\n\f\n") if d]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppcorpus")
    with gzip.open(os.path.join(REPO, "data", "corpus", "shakespeare_sonnets.txt.gz"), "rt") as f:
        sonnets = f.read()[:60_000].replace("\f", "")
    paras = [p for p in sonnets.split("\n\n") if p.strip()]
    a = d / "a.txt.gz"
    with gzip.open(a, "wt") as f:  # ~70 small documents
        f.write("\n\f\n".join("\n\n".join(paras[i:i + 3]) + "\n" for i in range(0, len(paras), 3)))
    b = d / "b.jsonl"
    with open(b, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Note {i}:\tcaf\u00e9  {i * 37}\n\u2581 end"}) + "\n")
    files = [str(a), str(b)]
    model = train_tokenizer(files, str(d / "tok"), 400, "bpe")
    return files, model, d


def test_datasets_match_tokenizer_and_workers(corpus, tmp_path) -> None:
    """Each document is stored as tokenizer.encode(doc) + [eos], every document lands in exactly one
    split, and 2 workers give byte-identical files to 1 worker."""
    files, model, _ = corpus
    s1 = preprocess(files, model, str(tmp_path / "w1"), valid_fraction=0.2, workers=1)
    s2 = preprocess(files, model, str(tmp_path / "w2"), valid_fraction=0.2, workers=2)
    assert s1 == s2
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    tok = Tokenizer(model)
    expected = Counter(tuple(tok.encode(d) + [tok.eos_id]) for f in files for d in _reference_docs(f))
    got = Counter()
    for split in ("train", "valid"):
        ds = IndexedDataset(str(tmp_path / "w1" / split), full_check=True)
        assert ds.vocab_size == tok.vocab_size and ds.tokenizer_fingerprint == tok.fingerprint
        got.update(tuple(ds[i].tolist()) for i in range(len(ds)))
    assert got == expected
    assert 0 < s1.valid_docs < s1.train_docs


def _valid_texts(files, model, out) -> set:
    preprocess(files, model, out, valid_fraction=0.25, workers=1)
    tok = Tokenizer(model)
    ds = IndexedDataset(os.path.join(out, "valid"))
    return {tok.decode(ds[i][:-1]) for i in range(len(ds))}


def test_split_is_stable(corpus, tmp_path) -> None:
    """The validation set is the same on a re-run and when the input files are given in another order."""
    files, model, _ = corpus
    first = _valid_texts(files, model, str(tmp_path / "a"))
    assert first == _valid_texts(files, model, str(tmp_path / "b"))
    assert first == _valid_texts(files[::-1], model, str(tmp_path / "c"))
    n = sum(len(_reference_docs(f)) for f in files)
    assert 0.05 * n < len(first) < 0.5 * n


def test_tiny_inputs(corpus, tmp_path) -> None:
    """Two documents still give a non-empty train and valid split; one document is refused."""
    _, model, _ = corpus
    two = tmp_path / "two.txt"
    two.write_text("first document\n\f\nsecond document\n")
    st = preprocess([str(two)], model, str(tmp_path / "o"), valid_fraction=0.01, workers=1)
    assert (st.train_docs, st.valid_docs) == (1, 1)
    one = tmp_path / "one.txt"
    one.write_text("no form feed, so one document\n")
    with pytest.raises(DatasetError, match="at least 2"):
        preprocess([str(one)], model, str(tmp_path / "o2"), workers=1)


def test_unigram_entropy(corpus, tmp_path) -> None:
    """Entropy in nats of the empirical token distribution (eos included), computed independently."""
    files, model, _ = corpus
    preprocess(files, model, str(tmp_path), valid_fraction=0.2, workers=1)
    ds = IndexedDataset(str(tmp_path / "valid"))
    counts = Counter(ds.tokens.tolist())
    n = sum(counts.values())
    ref = -sum(c / n * math.log(c / n) for c in counts.values())
    assert unigram_entropy(str(tmp_path / "valid")) == pytest.approx(ref, rel=1e-12)


def test_cli(corpus, tmp_path, capsys) -> None:
    """`megaloop tokenizer` and `megaloop preprocess` write their outputs and return 0; bad input
    raises DatasetError (missing file, corrupt tokenizer); --help works."""
    files, _, _ = corpus
    assert tokenizer_main(["--input", *files, "--out", str(tmp_path / "t"), "--vocab-size", "380",
                           "--type", "bpe"]) == 0
    assert Tokenizer(str(tmp_path / "t.model")).vocab_size == 380
    assert preprocess_main(["--input", *files, "--tokenizer", str(tmp_path / "t.model"), "--out-dir",
                            str(tmp_path / "out"), "--workers", "1", "--valid-fraction", "0.1"]) == 0
    assert IndexedDataset(str(tmp_path / "out" / "train")).n_docs > 0
    with pytest.raises(DatasetError, match="not found"):
        preprocess_main(["--input", str(tmp_path / "missing.txt"), "--tokenizer", str(tmp_path / "t.model"),
                         "--out-dir", str(tmp_path / "o")])
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DatasetError, match="bad.model"):
        preprocess_main(["--input", *files, "--tokenizer", str(tmp_path / "bad.model"), "--out-dir",
                         str(tmp_path / "o")])
    for main, prog in ((tokenizer_main, "megaloop tokenizer"), (preprocess_main, "megaloop preprocess")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0 and prog in capsys.readouterr().out
