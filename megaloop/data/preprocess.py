"""Raw text -> tokenized train/valid datasets (PREFIX.bin/.idx), with several worker processes.

Split: a document goes to validation when the hash of its text, read as a number in [0, 1), is
below `valid_fraction`. That is stable (independent of file order, worker count and the other
documents) and puts exact duplicates on the same side, so they cannot leak across the split.
Each side is guaranteed at least one document.

Order: workers encode chunks of consecutive documents and results are written in input order,
so the output is byte-identical for any number of workers.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .documents import check_input_files, iter_documents, no_text_error
from .errors import DatasetError
from .indexed import IndexedDataset, IndexedDatasetWriter, dtype_for_vocab
from .tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # ~1 MB of text per task: big enough to amortise IPC, small enough to balance


def split_score(text: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from the document's content."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"mloopval").digest()
    return int.from_bytes(h, "little") / 2.0**64


def assign_split(files: Sequence[str], text_key: str, valid_fraction: float) -> np.ndarray:
    """Boolean per document (in reading order): True = validation."""
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid fraction must be in (0, 1), got {valid_fraction}")
    scores = np.array([split_score(d) for d in iter_documents(files, text_key)], dtype=np.float64)
    if len(scores) == 0:
        raise no_text_error(list(files), text_key)
    if len(scores) < 2:
        raise DatasetError(f"the input has {len(scores)} document(s); a train/validation split needs at least 2. "
                           f"Separate documents in .txt files with a line holding only a form feed (\\f), "
                           f"or use .jsonl with one document per line")
    valid = scores < valid_fraction
    # Tiny corpora: force one document to each side so neither dataset is empty.
    if not valid.any():
        valid[np.argmin(scores)] = True
    if valid.all():
        valid[np.argmax(scores)] = False
    return valid


# ---------------------------------------------------------------- worker side

_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(model_path)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _TOKENIZER is not None
    dtype = dtype_for_vocab(_TOKENIZER.vocab_size)
    return [np.asarray(ids, dtype=dtype) for ids in _TOKENIZER.encode_batch(texts)]


def _context() -> mp.context.BaseContext:
    """fork where available: spawn/forkserver children re-import the caller's __main__, which
    re-runs any unguarded script that calls ensure_prepared (and would deadlock on its cache lock).
    Workers only run sentencepiece and numpy, never touch torch or process groups inherited
    from the parent, and exit without running its destructors, so forking a trainer is safe."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    buf: list[str] = []
    size = 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if size >= CHUNK_CHARS:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


@dataclass
class PreprocessStats:
    train_docs: int = 0
    valid_docs: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0


def preprocess(files: Sequence[str], tokenizer_path: str, out_dir: str, valid_fraction: float = 0.02,
               workers: int = 2, text_key: str = "text",
               log: Callable[[str], None] = lambda s: None) -> PreprocessStats:
    """Tokenize `files` into out_dir/train.{bin,idx} and out_dir/valid.{bin,idx}."""
    files = check_input_files(files)
    tok = Tokenizer(tokenizer_path)
    is_valid = assign_split(files, text_key, valid_fraction)
    log(f"preprocess: {len(is_valid)} documents from {len(files)} file(s), {int(is_valid.sum())} held out "
        f"for validation, {workers} worker(s)")
    os.makedirs(out_dir, exist_ok=True)
    stats = PreprocessStats()
    writers = {s: IndexedDatasetWriter(os.path.join(out_dir, s), tok.vocab_size, tok.eos_id, tok.fingerprint)
               for s in ("train", "valid")}
    pool = None
    try:
        chunks = _chunks(iter_documents(files, text_key))
        if workers > 1:
            pool = _context().Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,))
            results = pool.imap(_encode_chunk, chunks)  # imap keeps input order
        else:
            _init_worker(tokenizer_path)
            results = map(_encode_chunk, chunks)
        i = 0
        for arrays in results:
            for ids in arrays:
                side = "valid" if is_valid[i] else "train"
                writers[side].add_document(ids)
                if side == "valid":
                    stats.valid_docs += 1
                    stats.valid_tokens += len(ids) + 1
                else:
                    stats.train_docs += 1
                    stats.train_tokens += len(ids) + 1
                i += 1
        if i != len(is_valid):
            raise DatasetError(f"the input files changed while being read ({len(is_valid)} then {i} documents); "
                               f"run preprocess again")
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    log(f"preprocess: train {stats.train_docs} docs / {stats.train_tokens:,} tokens, "
        f"valid {stats.valid_docs} docs / {stats.valid_tokens:,} tokens -> {out_dir}")
    return stats


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats/token) of the dataset's own unigram distribution, end-of-document ids included.

    That is the loss of the best context-free predictor fitted to this very data: a trained model
    should be well below it on the validation split.
    """
    ds = IndexedDataset(prefix)
    if ds.n_tokens == 0:
        raise DatasetError(f"{ds.prefix}: empty dataset, its entropy is undefined")
    counts = np.zeros(ds.vocab_size, dtype=np.int64)
    step = 1 << 24
    for s in range(0, ds.n_tokens, step):
        counts += np.bincount(np.asarray(ds.tokens[s:s + step]), minlength=ds.vocab_size)[:ds.vocab_size]
    p = counts[counts > 0] / ds.n_tokens
    return float(-(p * np.log(p)).sum())
