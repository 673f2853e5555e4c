"""Tokenizer contracts: lossless, deterministic, eos reserved, clear errors."""
from __future__ import annotations

import gzip
import json
import os

import pytest

from megaloop.data.errors import DatasetError, TokenizerError
from megaloop.data.tokenizer import Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = [
    "",
    " ",
    "plain words",
    "  leading and trailing spaces  ",
    "tabs\there\t\tand\t",
    "runs     of      spaces\n\n\n\nand blank lines\n",
    "\n starts with a newline",
    "windows\r\nline\rends",
    "digits 0 1 2 3 1234567890 3.14159 -42 1e10",
    "unicode: caf\u00e9 na\u00efve \u00fcber \u00df \u00e6\u00f8\u00e5 \u0391\u03b2\u03b3 \u041f\u0440\u0438\u0432\u0435\u0442",
    "cjk \u6f22\u5b57\u304b\u306a \ud55c\uad6d\uc5b4 and emoji \U0001f642\U0001f680 and \u200b zero width",
    "combining e\u0301 vs \u00e9, full-width \uff21\uff22\uff23 \uff11\uff12 (NFKC would change these)",
    "control \x00 \x01 \x7f chars and \u00a0nbsp",
    "\u2581 the sentencepiece meta symbol itself \u2581\u2581",
    "<unk> </s> <s> <0x41> look like special pieces",
]


def _sample_text(limit: int) -> str:
    with gzip.open(os.path.join(REPO, "data", "corpus", "shakespeare_sonnets.txt.gz"), "rt") as f:
        return f.read()[:limit]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("tokcorpus")
    txt = d / "a.txt.gz"
    with gzip.open(txt, "wt") as f:
        f.write(_sample_text(40_000) + "\n\f\n" + "Numbers 123 and\ttabs  spaces.\n")
    jsonl = d / "b.jsonl"
    with open(jsonl, "w") as f:
        for i in range(50):
            f.write(json.dumps({"text": f"Document {i}: caf\u00e9 {i * 7919} the end.\n", "id": i}) + "\n")
    return [str(txt), str(jsonl)]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tok(request, corpus, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp(f"tok_{request.param}") / "m"
    return Tokenizer(train_tokenizer(corpus, str(out), 400, request.param))


def test_round_trip_is_lossless(tok: Tokenizer) -> None:
    """decode(encode(x)) == x for whitespace runs, tabs, newlines, CR, digits, any unicode."""
    for s in TRICKY + ["\n".join(TRICKY), _sample_text(3000)]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_vocab_and_eos(tok: Tokenizer) -> None:
    """The vocab has the requested size; the eos id exists and never appears inside encoded text."""
    assert tok.vocab_size == 400
    assert 0 <= tok.eos_id < tok.vocab_size
    assert tok.eos_id not in tok.encode("\n".join(TRICKY) + "</s>")


def test_digits_are_split(tok: Tokenizer) -> None:
    """split_digits: a number is one token per digit."""
    pieces = [tok.id_to_piece(i) for i in tok.encode("1234567")]
    assert "".join(pieces) == "1234567" and len(pieces) == 7


def test_training_is_deterministic(corpus, tmp_path) -> None:
    """Same inputs and arguments give a byte-identical model file."""
    a = train_tokenizer(corpus, str(tmp_path / "a"), 350, "bpe")
    b = train_tokenizer(corpus, str(tmp_path / "b"), 350, "bpe")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_missing_and_corrupt_model(tmp_path) -> None:
    """A missing or corrupt .model raises TokenizerError (a DatasetError/ValueError) naming the file."""
    with pytest.raises(TokenizerError, match="not found.*megaloop tokenizer"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DatasetError, match="bad.model"):
        Tokenizer(str(bad))
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        Tokenizer(str(empty))


def test_bad_training_inputs(corpus, tmp_path) -> None:
    """Too small a vocab, a missing input file, and bad JSON lines give clear DatasetErrors."""
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(corpus, str(tmp_path / "m"), 100, "bpe")
    with pytest.raises(DatasetError, match="not found"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "m"), 400, "bpe")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2"):
        train_tokenizer([str(bad)], str(tmp_path / "m"), 400, "bpe")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"body": "ok"}\n')
    with pytest.raises(DatasetError, match="text-key"):
        train_tokenizer([str(nokey)], str(tmp_path / "m"), 400, "bpe")
