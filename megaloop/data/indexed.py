"""Memory-mapped token datasets: PREFIX.bin (tokens) + PREFIX.idx (header and document offsets).

PREFIX.bin is the token ids of all documents back to back, each document followed by the
end-of-document id, as little-endian uint16 (vocab <= 65535) or uint32.

PREFIX.idx, little-endian:
    magic        8s   b"MLOOPIDX"
    version      u32  1
    dtype code   u32  2 = uint16, 4 = uint32 (the item size)
    vocab_size   u64  of the tokenizer that produced the tokens
    eos_id       i64
    n_docs       u64
    n_tokens     u64  == offsets[-1] == size of .bin / item size
    max_token    u64  largest id in .bin (so `max < vocab` is checked without reading the tokens)
    tokenizer    u64  fingerprint of the tokenizer model (0 = unknown)
    bin_crc32    u32  of the whole .bin, checked by a full check only
    offsets_crc  u32  of the offsets array
    offsets      i64[n_docs + 1], offsets[0] == 0, document i = tokens[offsets[i]:offsets[i+1]]

The writer writes both files under temporary names and renames them into place (.bin first,
.idx last), so a crash never leaves a pair that looks complete. The reader validates the header
against the file sizes cheaply on open; `full_check=True` also reads every token.
"""
from __future__ import annotations

import array
import os
import struct
import zlib
from typing import Iterable, Optional, Union

import numpy as np

from .errors import REBUILD_HINT, DatasetError

MAGIC = b"MLOOPIDX"
VERSION = 1
HEADER = struct.Struct("<8sIIQqQQQQII")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned type that holds every id in [0, vocab_size)."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab size {vocab_size} is out of range (1 .. 2^32)")
    return DTYPES[2] if vocab_size <= 65535 else DTYPES[4]


def strip_prefix(path: str) -> str:
    """Accept PREFIX, PREFIX.bin or PREFIX.idx."""
    path = os.fspath(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else path


class TokenFileWriter:
    """The .bin half of a token file pair: documents appended to a temporary file, their lengths
    kept (8 bytes per document). Subclasses write the index and publish the pair atomically
    (`finalize`): on an exception inside `with`, the temporary files are removed and nothing is
    published."""

    def __init__(self, prefix: str, vocab_size: int, eos_id: int, dtype: np.dtype, tokenizer_fingerprint: int = 0):
        self.prefix = strip_prefix(prefix)
        self.vocab_size, self.eos_id = int(vocab_size), int(eos_id)
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos id {eos_id} outside the vocabulary [0, {vocab_size})")
        self.fingerprint = int(tokenizer_fingerprint) & (2**64 - 1)
        self.dtype = np.dtype(dtype)
        d = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(d, exist_ok=True)
        self._tmp_bin = f"{self.prefix}.bin.tmp{os.getpid()}"
        self._tmp_idx = f"{self.prefix}.idx.tmp{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array.array("q")
        self._max = 0
        self._crc = 0
        self._eos = np.array([self.eos_id], dtype=self.dtype)
        self._done = False

    @property
    def n_docs(self) -> int:
        return len(self._lengths)

    def _check_range(self, arr: np.ndarray) -> None:
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise DatasetError(f"token id {hi if hi >= self.vocab_size else lo} outside the vocabulary "
                                   f"[0, {self.vocab_size}) while writing {self.prefix}.bin")
            self._max = max(self._max, hi)

    def add_document(self, tokens: Union[np.ndarray, Iterable[int]]) -> None:
        """Append one document; its end-of-document id is appended here."""
        arr = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64)
        self._check_range(arr)
        self._write(np.concatenate([arr.astype(self.dtype), self._eos]).tobytes())
        self._lengths.append(arr.size + 1)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given back to back, each already ending with the eos id."""
        if not len(lengths):
            return
        self._check_range(tokens)
        self._write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.frombytes(np.asarray(lengths, dtype=np.int64).tobytes())

    def _write(self, data: bytes) -> None:
        self._bin.write(data)
        self._crc = zlib.crc32(data, self._crc)

    def remove_document(self, k: int) -> np.ndarray:
        """Take document k out of the file (a copy of the rest, so for small outputs only: it moves
        one document across the split of a tiny corpus). Returns its tokens, eos included."""
        self._bin.flush()
        start = sum(self._lengths[:k]) * self.dtype.itemsize
        size = self._lengths[k] * self.dtype.itemsize
        old = f"{self._tmp_bin}.old"
        self._bin.close()
        os.replace(self._tmp_bin, old)
        self._bin, self._crc, self._max = open(self._tmp_bin, "wb"), 0, 0
        with open(old, "rb") as src:
            for lo, hi in ((0, start), (start + size, None)):
                src.seek(lo)
                todo = None if hi is None else hi - lo
                while todo is None or todo > 0:
                    chunk = src.read(1 << 24 if todo is None else min(todo, 1 << 24))
                    if not chunk:
                        break
                    self._check_range(np.frombuffer(chunk, dtype=self.dtype))
                    self._write(chunk)
                    if todo is not None:
                        todo -= len(chunk)
            src.seek(start)
            doc = np.frombuffer(src.read(size), dtype=self.dtype).copy()
        os.remove(old)
        del self._lengths[k]
        return doc

    def _close_bin(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()

    def _publish(self, extra: Optional[tuple[str, str]] = None) -> None:
        """Rename into place: .bin first, any sidecar next, .idx last, so a reader that finds a
        new .idx also finds what it describes."""
        os.replace(self._tmp_bin, f"{self.prefix}.bin")
        if extra is not None:
            os.replace(*extra)
        os.replace(self._tmp_idx, f"{self.prefix}.idx")
        self._done = True

    def finalize(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx, f"{self._tmp_bin}.old"):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            self.finalize()
        elif not self._done:
            self.abort()


class IndexedDatasetWriter(TokenFileWriter):
    """Writes megaloop's own pair (MLOOPIDX): append documents, `finalize()` publishes atomically."""

    def __init__(self, prefix: str, vocab_size: int, eos_id: int, tokenizer_fingerprint: int = 0):
        super().__init__(prefix, vocab_size, eos_id, dtype_for_vocab(vocab_size), tokenizer_fingerprint)

    def finalize(self) -> None:
        self._close_bin()
        offsets = np.zeros(len(self._lengths) + 1, dtype="<i8")
        np.cumsum(np.frombuffer(self._lengths, dtype=np.int64), out=offsets[1:])
        max_token = max(self._max, self.eos_id) if len(offsets) > 1 else 0
        header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.vocab_size, self.eos_id,
                             len(offsets) - 1, int(offsets[-1]), max_token, self.fingerprint,
                             self._crc, zlib.crc32(offsets.tobytes()))
        with open(self._tmp_idx, "wb") as f:
            f.write(header)
            f.write(offsets.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._publish()


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx. `ds[i]` is document i (with its eos) as a numpy view;
    `ds.tokens` is the whole token stream (memory-mapped)."""

    def __init__(self, prefix: str, full_check: bool = False):
        self.prefix = strip_prefix(prefix)
        idx_path, bin_path = f"{self.prefix}.idx", f"{self.prefix}.bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DatasetError(f"dataset file not found: {p}. Build it with `megaloop preprocess --input "
                                   f"FILES --tokenizer M.model --out-dir DIR` (or leave data.train/data.valid "
                                   f"unset to build from data.corpus)")

        def bad(path: str, what: str) -> DatasetError:
            return DatasetError(f"{path}: {what}. The dataset is truncated or corrupt: {REBUILD_HINT}")

        with open(idx_path, "rb") as f:
            raw = f.read()
        if len(raw) < HEADER.size or raw[:8] != MAGIC:
            raise bad(idx_path, "not a megaloop index (bad magic or too short)")
        (_, version, code, vocab, eos, n_docs, n_tokens, max_token, fp, bin_crc, off_crc) = HEADER.unpack_from(raw)
        if version != VERSION:
            raise DatasetError(f"{idx_path}: index format version {version}, this megaloop reads version "
                               f"{VERSION}: {REBUILD_HINT}")
        if code not in DTYPES:
            raise bad(idx_path, f"unknown dtype code {code}")
        if len(raw) != HEADER.size + 8 * (n_docs + 1):
            raise bad(idx_path, f"size {len(raw)} bytes does not match its {n_docs} documents")
        offsets = np.frombuffer(raw, dtype="<i8", offset=HEADER.size)
        if zlib.crc32(offsets.tobytes()) != off_crc:
            raise bad(idx_path, "document offsets fail their checksum")
        if offsets[0] != 0 or (n_docs and np.any(np.diff(offsets) <= 0)) or offsets[-1] != n_tokens:
            raise bad(idx_path, "document offsets are not increasing from 0 to the token count")
        self.dtype = DTYPES[code]
        if self.dtype != dtype_for_vocab(vocab) or not 0 <= eos < vocab:
            raise bad(idx_path, f"header is inconsistent (vocab {vocab}, dtype code {code}, eos {eos})")
        size = os.path.getsize(bin_path)
        if size != n_tokens * self.dtype.itemsize:
            raise bad(bin_path, f"size {size} bytes, expected {n_tokens * self.dtype.itemsize} "
                                f"({n_tokens} tokens of {self.dtype.itemsize} bytes)")
        if n_tokens and max_token >= vocab:
            raise bad(idx_path, f"max token id {max_token} >= vocab size {vocab}")
        self.vocab_size, self.eos_id = int(vocab), int(eos)
        self.n_docs, self.n_tokens, self.max_token = int(n_docs), int(n_tokens), int(max_token)
        self.tokenizer_fingerprint = int(fp)
        self._bin_crc = bin_crc
        self.offsets = offsets
        self.tokens: np.ndarray = (np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens
                                   else np.zeros(0, dtype=self.dtype))
        if full_check:
            self.check()

    def check(self, chunk: int = 1 << 24) -> None:
        """Read every token: checksum, max id and eos placement all match the index."""
        crc, hi = 0, 0
        for s in range(0, self.n_tokens, chunk):
            part = np.asarray(self.tokens[s:s + chunk])
            crc = zlib.crc32(part.tobytes(), crc)
            hi = max(hi, int(part.max()))
        ends = self.offsets[1:] - 1
        if (crc != self._bin_crc or (self.n_tokens and hi != self.max_token)
                or (len(ends) and np.any(self.tokens[ends] != self.eos_id))):
            raise DatasetError(f"{self.prefix}.bin: tokens do not match their index (checksum, max id or "
                               f"end-of-document marks). The dataset is corrupt: {REBUILD_HINT}")

    def __len__(self) -> int:
        return self.n_docs

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents")
        i %= self.n_docs
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, docs={self.n_docs}, tokens={self.n_tokens}, "
                f"vocab={self.vocab_size}, dtype={self.dtype.name})")


def check_vocab(ds, vocab_size: int, tokenizer_fingerprint: Optional[int] = None) -> None:
    """Raise DatasetError unless `ds` was built for this vocabulary (and tokenizer, when known).

    A Megatron pair records no vocabulary: its dtype must hold every id of the model's vocabulary,
    and its largest id (read once, when no sidecar records it) must be inside it."""
    if ds.vocab_size is None:
        if np.iinfo(ds.dtype).max < vocab_size - 1:
            raise DatasetError(f"{ds.prefix}.idx stores {ds.dtype.name} ids (up to {np.iinfo(ds.dtype).max}) but the "
                               f"tokenizer has {vocab_size} tokens (model.vocab_size): these files were made with "
                               f"another tokenizer. Tokenize the corpus again with this one (`megaloop preprocess "
                               f"--format megatron`, or megatron's preprocess_data.py) or set model.vocab_size to "
                               f"the vocabulary the files were made with")
        hi = ds.max_token if ds.max_token is not None else ds.scan_max_token()
        if hi >= vocab_size:
            raise DatasetError(f"{ds.prefix}.bin holds token id {hi}, outside model.vocab_size={vocab_size}: these "
                               f"files were made with another tokenizer. Set model.vocab_size to at least {hi + 1} "
                               f"or tokenize the corpus again with the configured tokenizer")
        return
    if ds.vocab_size != vocab_size:
        raise DatasetError(f"{ds.prefix}.idx was built with a {ds.vocab_size}-token vocabulary but the model has "
                           f"model.vocab_size={vocab_size}: set model.vocab_size={ds.vocab_size} or re-run "
                           f"`megaloop preprocess` with a matching tokenizer")
    if tokenizer_fingerprint and ds.tokenizer_fingerprint and ds.tokenizer_fingerprint != tokenizer_fingerprint:
        raise DatasetError(f"{ds.prefix}.idx was built with a different tokenizer than the one configured: "
                           f"re-run `megaloop preprocess` with that tokenizer, or point data.tokenizer at "
                           f"the one used to build it")
