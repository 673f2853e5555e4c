"""Megatron-format token files (PREFIX.bin + PREFIX.idx, header MMIDIDX), read and written.

This is the format megatron-core's IndexedDatasetBuilder writes (Megatron-LM, GPT-NeoX, NeMo and
datatrove produce it). PREFIX.idx, little-endian:
    magic        9s   b"MMIDIDX\\x00\\x00"
    version      u64  1
    dtype code   u8   1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    n_sequences  u64
    n_doc_idx    u64  = number of documents + 1
    lengths      i32[n_sequences]   tokens per sequence
    pointers     i64[n_sequences]   byte offset of each sequence in .bin
    doc_index    i64[n_doc_idx]     sequence index where each document starts; [0] = 0, [-1] = n_sequences
    (modes       i8[n_sequences], multimodal files only; ignored here)
PREFIX.bin is the sequences back to back. megaloop reads the token stream as it is: documents in
file order, no eos added (Megatron's preprocess appends one with --append-eod). It needs the
sequences to be contiguous in .bin, which every builder writes.

The format records neither the vocabulary nor the tokenizer. When megaloop writes a pair it adds
PREFIX.megaloop.json beside it (vocab size, eos id, tokenizer fingerprint, largest id), which
megatron-core ignores, so the tokenizer check works as for megaloop's own files. For a pair
without it, the largest id is found by reading the tokens once (`scan_max_token`).
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

import numpy as np

from .errors import REBUILD_HINT, DatasetError
from .indexed import TokenFileWriter, strip_prefix

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEAD = struct.Struct("<9sQBQQ")
CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
         8: np.uint16}
SIDECAR = ".megaloop.json"


def code_of(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, t in CODES.items():
        if np.dtype(t) == dtype:
            return code
    raise ValueError(f"no Megatron dtype code for {dtype}")


def megatron_dtype(vocab_size: int) -> np.dtype:
    """The dtype megatron-core's preprocess picks (DType.optimal_dtype): uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def is_megatron(prefix: str) -> bool:
    try:
        with open(f"{strip_prefix(prefix)}.idx", "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class MegatronWriter(TokenFileWriter):
    """Writes a Megatron pair, one sequence per document (its eos included), plus the sidecar."""

    def __init__(self, prefix: str, vocab_size: int, eos_id: int, tokenizer_fingerprint: int = 0):
        super().__init__(prefix, vocab_size, eos_id, megatron_dtype(vocab_size), tokenizer_fingerprint)
        self._tmp_side = f"{self.prefix}{SIDECAR}.tmp{os.getpid()}"

    def finalize(self) -> None:
        self._close_bin()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        if len(lengths) and lengths.max() > np.iinfo(np.int32).max:
            raise DatasetError(f"{self.prefix}: a document of {int(lengths.max())} tokens does not fit Megatron's "
                               f"32-bit sequence lengths: split it, or use --format megaloop")
        pointers = np.zeros(len(lengths), dtype="<i8")
        if len(lengths):
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(self._tmp_idx, "wb") as f:
            f.write(HEAD.pack(MAGIC, VERSION, code_of(self.dtype), len(lengths), len(lengths) + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        side = {"vocab_size": self.vocab_size, "eos_id": self.eos_id, "tokenizer": f"{self.fingerprint:016x}",
                "max_token": max(self._max, self.eos_id) if len(lengths) else 0, "n_tokens": int(lengths.sum())}
        with open(self._tmp_side, "w") as f:
            json.dump(side, f, indent=1)
        self._publish((self._tmp_side, f"{self.prefix}{SIDECAR}"))

    def abort(self) -> None:
        super().abort()
        if os.path.exists(self._tmp_side):
            os.remove(self._tmp_side)


class MegatronDataset:
    """Read-only view of a Megatron pair with the interface of IndexedDataset: `tokens` (the whole
    stream, memory-mapped), `n_tokens`, `n_docs`, `offsets` and `ds[i]` (document i).
    `vocab_size`, `eos_id` and `max_token` are None and `tokenizer_fingerprint` 0 when unknown
    (a pair megaloop did not write)."""

    def __init__(self, prefix: str, full_check: bool = False):
        self.prefix = strip_prefix(prefix)
        idx_path, bin_path = f"{self.prefix}.idx", f"{self.prefix}.bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DatasetError(f"dataset file not found: {p}. A Megatron dataset is a PREFIX.bin/PREFIX.idx pair: "
                                   f"give the PREFIX (without .bin/.idx)")

        def bad(path: str, what: str) -> DatasetError:
            return DatasetError(f"{path}: {what}. The Megatron dataset is truncated or corrupt: write it again "
                                f"(megatron's preprocess_data.py, or `megaloop preprocess --format megatron`)")

        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEAD.size)
        if len(head) < HEAD.size or head[:9] != MAGIC:
            raise bad(idx_path, "not a Megatron index (bad magic or too short)")
        _, version, code, n_seq, n_doc_idx = HEAD.unpack(head)
        if version != VERSION:
            raise bad(idx_path, f"index version {version}, expected {VERSION}")
        if code not in CODES:
            raise bad(idx_path, f"unknown dtype code {code}")
        self.dtype = np.dtype(CODES[code])
        if self.dtype.kind == "f":
            raise DatasetError(f"{idx_path}: holds {self.dtype.name} values, not token ids. Point data.train/"
                               f"data.valid at a token dataset (integer dtype)")
        need = HEAD.size + 12 * n_seq + 8 * n_doc_idx
        if size < need or n_doc_idx < 1:
            raise bad(idx_path, f"size {size} bytes, too small for its {n_seq} sequences and {n_doc_idx - 1} documents")
        mm = np.memmap(idx_path, dtype=np.uint8, mode="r")
        lengths = np.frombuffer(mm, dtype="<i4", count=n_seq, offset=HEAD.size)
        pointers = np.frombuffer(mm, dtype="<i8", count=n_seq, offset=HEAD.size + 4 * n_seq)
        doc_index = np.frombuffer(mm, dtype="<i8", count=n_doc_idx, offset=HEAD.size + 12 * n_seq)
        item = self.dtype.itemsize
        n_tokens = int(lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * item:
            raise bad(bin_path, f"size {bin_size} bytes, expected {n_tokens * item} ({n_tokens} tokens of {item} bytes)")
        expected_ptr = np.zeros(n_seq, dtype=np.int64)
        if n_seq:
            np.cumsum(lengths[:-1].astype(np.int64) * item, out=expected_ptr[1:])
        if np.any(lengths < 0) or not np.array_equal(pointers, expected_ptr):
            raise DatasetError(f"{idx_path}: its sequences are not stored back to back in {bin_path}; megaloop "
                               f"reads contiguous files only. Rewrite it with megatron-core's IndexedDatasetBuilder")
        if doc_index[0] != 0 or doc_index[-1] != n_seq or np.any(np.diff(doc_index) < 0):
            raise bad(idx_path, "document index is not increasing from 0 to the sequence count")
        self._lengths, self._pointers, self._doc_index = lengths, pointers, doc_index
        self.n_docs, self.n_tokens = int(n_doc_idx - 1), n_tokens
        self.tokens: np.ndarray = (np.memmap(bin_path, dtype=self.dtype.newbyteorder("<"), mode="r") if n_tokens
                                   else np.zeros(0, dtype=self.dtype))
        self.vocab_size: Optional[int] = None
        self.eos_id: Optional[int] = None
        self.max_token: Optional[int] = None
        self.tokenizer_fingerprint = 0
        self._read_sidecar()
        if full_check:
            self.check()

    def _read_sidecar(self) -> None:
        path = f"{self.prefix}{SIDECAR}"
        if not os.path.isfile(path):
            return
        try:
            with open(path) as f:
                side = json.load(f)
            vocab, eos, fp, hi, n = (int(side["vocab_size"]), int(side["eos_id"]), int(side["tokenizer"], 16),
                                     int(side["max_token"]), int(side["n_tokens"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path}: unreadable ({e}). Delete it (the pair is then read without a tokenizer "
                               f"check) or {REBUILD_HINT}") from None
        if n != self.n_tokens:
            raise DatasetError(f"{path} describes {n} tokens but {self.prefix}.bin holds {self.n_tokens}: it belongs "
                               f"to another version of the files. Delete it or {REBUILD_HINT}")
        self.vocab_size, self.eos_id, self.tokenizer_fingerprint, self.max_token = vocab, eos, fp, hi

    @property
    def offsets(self) -> np.ndarray:
        """Token offset of each document start, and the total at the end (n_docs + 1 entries)."""
        seq_starts = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=seq_starts[1:])
        return seq_starts[self._doc_index]

    def scan_max_token(self, chunk: int = 1 << 24) -> int:
        """Largest id in the file (reads every token once); negative ids are reported as bad data."""
        hi, lo = 0, 0
        for s in range(0, self.n_tokens, chunk):
            part = np.asarray(self.tokens[s:s + chunk])
            hi, lo = max(hi, int(part.max())), min(lo, int(part.min()))
        if lo < 0:
            raise DatasetError(f"{self.prefix}.bin holds a negative token id ({lo}): it is not a token dataset, or "
                               f"it is corrupt")
        self.max_token = hi
        return hi

    def check(self) -> None:
        hi = self.scan_max_token()
        if self.vocab_size is not None and hi >= self.vocab_size:
            raise DatasetError(f"{self.prefix}.bin: token id {hi} >= its recorded vocabulary {self.vocab_size}. The "
                               f"dataset is corrupt: {REBUILD_HINT}")

    def __len__(self) -> int:
        return self.n_docs

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        i %= self.n_docs
        a, b = int(self._doc_index[i]), int(self._doc_index[i + 1])
        return self.tokens[self._seq_start(a):self._seq_start(b)]

    def _seq_start(self, j: int) -> int:
        return self.n_tokens if j >= len(self._lengths) else int(self._pointers[j]) // self.dtype.itemsize

    def __repr__(self) -> str:
        return (f"MegatronDataset({self.prefix!r}, docs={self.n_docs}, tokens={self.n_tokens}, "
                f"dtype={self.dtype.name})")
