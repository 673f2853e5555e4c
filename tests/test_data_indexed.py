"""Indexed dataset contracts: exact round trip, dtype by vocab, corrupt files -> DatasetError."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from megaloop.data.errors import DatasetError
from megaloop.data.indexed import HEADER, IndexedDataset, IndexedDatasetWriter, check_vocab, dtype_for_vocab

EOS = 1


def _docs(vocab: int, n: int = 20, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=int(rng.integers(0, 50))) for _ in range(n)]


def _write(prefix: str, docs, vocab: int = 500) -> None:
    with IndexedDatasetWriter(prefix, vocab, EOS, tokenizer_fingerprint=1234) as w:
        for d in docs:
            w.add_document(d)


def test_round_trip(tmp_path) -> None:
    """Every document reads back exactly, with the eos appended; the stream is their concatenation."""
    docs = _docs(500)
    _write(str(tmp_path / "ds"), docs)
    ds = IndexedDataset(str(tmp_path / "ds"), full_check=True)
    assert len(ds) == len(docs) and ds.vocab_size == 500 and ds.eos_id == EOS
    assert ds.tokenizer_fingerprint == 1234
    for d, got in zip(docs, (ds[i] for i in range(len(ds)))):
        assert got.tolist() == d.tolist() + [EOS]
    assert ds.tokens.tolist() == [t for d in docs for t in d.tolist() + [EOS]]
    assert os.path.getsize(tmp_path / "ds.bin") == ds.n_tokens * 2
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # temp files renamed away


@pytest.mark.parametrize("vocab,dtype", [(300, np.uint16), (65535, np.uint16), (65536, np.uint32), (100_000, np.uint32)])
def test_dtype_from_vocab(tmp_path, vocab, dtype) -> None:
    """uint16 when every id fits (vocab <= 65535), else uint32; large ids survive the round trip."""
    assert dtype_for_vocab(vocab) == np.dtype(dtype)
    docs = [np.array([vocab - 1, 0, vocab // 2])]
    _write(str(tmp_path / "ds"), docs, vocab)
    ds = IndexedDataset(str(tmp_path / "ds"))
    assert ds.tokens.dtype == np.dtype(dtype)
    assert ds[0].tolist() == [vocab - 1, 0, vocab // 2, EOS]


def test_writer_rejects_out_of_vocab_and_crash_publishes_nothing(tmp_path) -> None:
    """An id >= vocab raises; an exception inside the writer leaves no .bin/.idx behind."""
    with pytest.raises(DatasetError, match="outside the vocabulary"):
        with IndexedDatasetWriter(str(tmp_path / "ds"), 100, EOS) as w:
            w.add_document([5, 6])
            w.add_document([100])
    assert os.listdir(tmp_path) == []


@pytest.fixture
def built(tmp_path) -> str:
    prefix = str(tmp_path / "ds")
    _write(prefix, _docs(500, n=30))
    return prefix


def _expect_error(prefix: str, match: str = "re-run `megaloop preprocess`", full: bool = False) -> None:
    with pytest.raises(DatasetError, match=match):
        IndexedDataset(prefix, full_check=full)


def test_truncated_bin(built) -> None:
    """A .bin shorter than the index says -> DatasetError naming the file and the fix."""
    with open(built + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(built + ".bin") - 2)
    _expect_error(built, match=r"ds\.bin.*re-run `megaloop preprocess`")


def test_truncated_idx(built) -> None:
    """An index cut short (in the header or in the offsets) -> DatasetError."""
    raw = open(built + ".idx", "rb").read()
    for cut in (len(raw) - 8, HEADER.size - 4, 3):
        open(built + ".idx", "wb").write(raw[:cut])
        _expect_error(built, match=r"ds\.idx")


def test_corrupt_magic_and_version(built) -> None:
    """Wrong magic or an unknown format version -> DatasetError."""
    raw = bytearray(open(built + ".idx", "rb").read())
    open(built + ".idx", "wb").write(b"XXXXXXXX" + raw[8:])
    _expect_error(built, match="bad magic")
    raw[8:12] = struct.pack("<I", 99)
    open(built + ".idx", "wb").write(bytes(raw))
    _expect_error(built, match="version 99")


def test_flipped_offsets(built) -> None:
    """Swapped document offsets are caught, by checksum and (checksum fixed up) by monotonicity."""
    raw = bytearray(open(built + ".idx", "rb").read())
    offsets = np.frombuffer(bytes(raw[HEADER.size:]), dtype="<i8").copy()
    offsets[[3, 4]] = offsets[[4, 3]]
    open(built + ".idx", "wb").write(bytes(raw[:HEADER.size]) + offsets.tobytes())
    _expect_error(built, match="checksum")
    fields = list(HEADER.unpack_from(raw))
    fields[-1] = zlib.crc32(offsets.tobytes())
    open(built + ".idx", "wb").write(HEADER.pack(*fields) + offsets.tobytes())
    _expect_error(built, match="not increasing")


def test_header_max_token_and_full_check(built) -> None:
    """max token >= vocab in the header is refused; a flipped token is found by the full check only."""
    raw = bytearray(open(built + ".idx", "rb").read())
    fields = list(HEADER.unpack_from(raw))
    good = bytes(raw)
    fields[7] = fields[3]  # max_token = vocab
    open(built + ".idx", "wb").write(HEADER.pack(*fields) + good[HEADER.size:])
    _expect_error(built, match="max token")
    open(built + ".idx", "wb").write(good)
    with open(built + ".bin", "r+b") as f:
        f.seek(10)
        f.write(b"\x07\x00")
    IndexedDataset(built)  # cheap checks pass: sizes are intact
    _expect_error(built, full=True)


def test_missing_files_and_vocab_mismatch(built, tmp_path) -> None:
    """A missing .idx/.bin names the file and `megaloop preprocess`; a vocab mismatch names both sizes."""
    _expect_error(str(tmp_path / "nothing"), match=r"nothing\.idx.*megaloop preprocess")
    os.remove(built + ".bin")
    _expect_error(built, match=r"not found: .*ds\.bin")
    prefix = str(tmp_path / "other")
    _write(prefix, [[2, 3]], vocab=500)
    with pytest.raises(DatasetError, match="500.*model.vocab_size=4096"):
        check_vocab(IndexedDataset(prefix), 4096)
    with pytest.raises(DatasetError, match="different tokenizer"):
        check_vocab(IndexedDataset(prefix), 500, tokenizer_fingerprint=999)
