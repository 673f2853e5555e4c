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
import itertools
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .documents import ReadStats, check_input_files, iter_documents, no_text_error
from .errors import DatasetError
from .indexed import IndexedDatasetWriter
from .token_files import open_dataset
from .megatron import MegatronWriter
from .tokenizer import Tokenizer

CHUNK_CHARS = 1 << 20  # ~1 MB of text per task: big enough to amortise IPC, small enough to balance
IN_FLIGHT = 4  # chunks per worker between the reader and the writer (memory: ~IN_FLIGHT x workers MB)
FORMATS = {"megaloop": IndexedDatasetWriter, "megatron": MegatronWriter}


def split_score(text: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from the document's content."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"mloopval").digest()
    return int.from_bytes(h, "little") / 2.0**64


def assign_split(files: Sequence[str], text_key: str, valid_fraction: float, split: str = "train") -> np.ndarray:
    """Boolean per document (in reading order): True = validation. (preprocess decides the same
    way on the fly; this whole-corpus version serves tools that want the assignment alone.)"""
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid fraction must be in (0, 1), got {valid_fraction}")
    scores = np.array([split_score(d) for d in iter_documents(files, text_key, split)], dtype=np.float64)
    if len(scores) == 0:
        raise no_text_error(list(files), text_key, split)
    if len(scores) < 2:
        raise DatasetError(too_few_documents(len(scores)))
    valid = scores < valid_fraction
    # Tiny corpora: force one document to each side so neither dataset is empty.
    if not valid.any():
        valid[np.argmin(scores)] = True
    if valid.all():
        valid[np.argmax(scores)] = False
    return valid


def too_few_documents(n: int) -> str:
    return (f"the input has {n} document(s); a train/validation split needs at least 2. "
            f"Separate documents in .txt files with a line holding only a form feed (\\f), "
            f"or use .jsonl with one document per line")


# ---------------------------------------------------------------- worker side

_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker (Hugging Face tokenizers)
    _TOKENIZER = Tokenizer(model_path)


@dataclass
class EncodedChunk:
    """One chunk's documents, split into the two sides, each side's tokens back to back with an
    eos after every document. Scores are kept for the tiny-corpus fix-up."""
    tokens: tuple  # (train, valid) arrays
    lengths: tuple  # (train, valid) int64 arrays
    scores: tuple  # (train, valid) float64 arrays


def _encode_chunk(task: tuple) -> EncodedChunk:
    texts, valid_fraction = task
    tok = _TOKENIZER
    assert tok is not None
    scores = np.array([split_score(t) for t in texts], dtype=np.float64)
    is_valid = scores < valid_fraction
    ids = tok.encode_batch(texts)
    # All documents back to back with an eos after each, built without a Python loop per token
    # (this conversion is the main cost on top of the tokenizer's own encode).
    bodies = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    lengths = bodies + 1
    ends = np.cumsum(lengths) - 1
    dtype = np.int32 if tok.vocab_size <= 2**31 else np.int64
    flat = np.empty(int(ends[-1]) + 1 if len(ends) else 0, dtype=dtype)
    body = np.ones(len(flat), dtype=bool)
    body[ends] = False
    flat[body] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(bodies.sum()))
    flat[ends] = tok.eos_id
    side = np.repeat(is_valid, lengths)
    return EncodedChunk((flat[~side], flat[side]), (lengths[~is_valid], lengths[is_valid]),
                        (scores[~is_valid], scores[is_valid]))


def _context() -> mp.context.BaseContext:
    """fork where available: spawn/forkserver children re-import the caller's __main__, which
    re-runs any unguarded script that calls ensure_prepared (and would deadlock on its cache lock).
    Workers only run the tokenizer and numpy, never touch torch or process groups inherited
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


def _encoded(chunks: Iterator[list[str]], valid_fraction: float, tokenizer_path: str,
             workers: int) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order. The reading process only reads and writes; `workers`
    processes encode. At most IN_FLIGHT chunks per worker are in flight, so memory is bounded
    whatever the corpus size (Pool.imap would read ahead without limit); several, so that a
    stall of the reader (or of one worker) on a busy machine does not idle the others."""
    with _context().Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        inflight: deque = deque()
        for chunk in chunks:
            if len(inflight) >= IN_FLIGHT * workers:
                yield inflight.popleft().get()
            inflight.append(pool.apply_async(_encode_chunk, ((chunk, valid_fraction),)))
        while inflight:
            yield inflight.popleft().get()


@dataclass
class PreprocessStats:
    train_docs: int = 0
    valid_docs: int = 0
    train_tokens: int = 0
    valid_tokens: int = 0
    empty_skipped: int = 0


class _Progress:
    """Documents, tokens and tokens/s on a tqdm bar (stderr)."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(desc="preprocess", unit=" doc", dynamic_ncols=True, mininterval=1.0)

    def update(self, docs: int, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(docs)
            rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess(files: Sequence[str], tokenizer_path: str, out_dir: str, valid_fraction: float = 0.02,
               workers: int = 2, text_key: str = "text", log: Callable[[str], None] = lambda s: None,
               split: str = "train", fmt: str = "megaloop", progress: bool = False) -> PreprocessStats:
    """Tokenize `files` into out_dir/train.{bin,idx} and out_dir/valid.{bin,idx}, in one pass.

    The reading process streams documents (bounded memory: a few chunks in flight) to `workers`
    encoding processes and writes their output in input order; a document's side is decided by
    its hash (split_score) as it passes. fmt: "megaloop" (MLOOPIDX) or "megatron" (MMIDIDX).
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}: use {' or '.join(FORMATS)}")
    if not 0.0 < valid_fraction < 1.0:
        raise DatasetError(f"valid fraction must be in (0, 1), got {valid_fraction}")
    files = check_input_files(files, split)
    tok = Tokenizer(tokenizer_path)
    log(f"preprocess: {len(files)} source(s), {workers} worker(s), {fmt} format -> {out_dir}")
    created = not os.path.exists(out_dir)  # removed again if the build fails: no trace left
    os.makedirs(out_dir, exist_ok=True)
    stats = PreprocessStats()
    read = ReadStats()
    writers = {s: FORMATS[fmt](os.path.join(out_dir, s), tok.vocab_size, tok.eos_id, tok.fingerprint)
               for s in ("train", "valid")}
    # The extreme score on each side, for the tiny-corpus fix-up: (score, index within its side).
    lowest_train, highest_valid = (2.0, -1), (-1.0, -1)
    bar = _Progress(progress)
    try:
        chunks = _chunks(iter_documents(files, text_key, split, stats=read))
        for enc in _encoded(chunks, valid_fraction, tokenizer_path, workers):
            for i, side in enumerate(("train", "valid")):
                scores = enc.scores[i]
                if len(scores):
                    j = int(np.argmin(scores) if side == "train" else np.argmax(scores))
                    if side == "train" and scores[j] < lowest_train[0]:
                        lowest_train = (float(scores[j]), writers[side].n_docs + j)
                    if side == "valid" and scores[j] > highest_valid[0]:
                        highest_valid = (float(scores[j]), writers[side].n_docs + j)
                writers[side].add_documents(enc.tokens[i], enc.lengths[i])
                setattr(stats, f"{side}_docs", getattr(stats, f"{side}_docs") + len(enc.lengths[i]))
                setattr(stats, f"{side}_tokens", getattr(stats, f"{side}_tokens") + int(enc.lengths[i].sum()))
            bar.update(sum(len(x) for x in enc.lengths), stats.train_tokens + stats.valid_tokens)
        n = stats.train_docs + stats.valid_docs
        if n == 0:
            raise no_text_error(list(files), text_key, split)
        if n < 2:
            raise DatasetError(too_few_documents(n))
        # Tiny corpora: force one document to each side so neither dataset is empty (the one
        # whose score is nearest the other side, as assign_split does).
        for src, dst, (_, k) in (("train", "valid", lowest_train), ("valid", "train", highest_valid)):
            if getattr(stats, f"{dst}_docs") == 0:
                doc = writers[src].remove_document(k)
                writers[dst].add_documents(doc, np.array([len(doc)]))
                for s, sign in ((src, -1), (dst, 1)):
                    setattr(stats, f"{s}_docs", getattr(stats, f"{s}_docs") + sign)
                    setattr(stats, f"{s}_tokens", getattr(stats, f"{s}_tokens") + sign * len(doc))
        stats.empty_skipped = read.empty_skipped
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        if created:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    finally:
        bar.close()
    log(f"preprocess: train {stats.train_docs} docs / {stats.train_tokens:,} tokens, "
        f"valid {stats.valid_docs} docs / {stats.valid_tokens:,} tokens"
        + (f", {stats.empty_skipped} empty documents skipped" if stats.empty_skipped else "") + f" -> {out_dir}")
    return stats


def unigram_entropy(prefix: str) -> float:
    """Entropy (nats/token) of the dataset's own unigram distribution, end-of-document ids included.

    That is the loss of the best context-free predictor fitted to this very data: a trained model
    should be well below it on the validation split.
    """
    ds = open_dataset(prefix)
    if ds.n_tokens == 0:
        raise DatasetError(f"{ds.prefix}: empty dataset, its entropy is undefined")
    size = ds.vocab_size or (ds.max_token if ds.max_token is not None else ds.scan_max_token()) + 1
    counts = np.zeros(size, dtype=np.int64)
    step = 1 << 24
    for s in range(0, ds.n_tokens, step):
        counts += np.bincount(np.asarray(ds.tokens[s:s + step]), minlength=size)[:size]
    p = counts[counts > 0] / ds.n_tokens
    return float(-(p * np.log(p)).sum())
