"""From a `DataConfig` to ready datasets: validate given files, or build and cache from the corpus.

Cache layout: data.cache_dir/<key>/{tokenizer.model, train.bin/.idx, valid.bin/.idx, DONE}, where
key hashes everything the result depends on (corpus file paths, sizes and mtimes, vocab size,
tokenizer type or given tokenizer, valid fraction, text key, format version). A build happens in a
temporary directory that is renamed into place only after DONE is written, so a crash never
leaves a half-built cache that a later run would trust. A file lock makes concurrent callers
(e.g. the ranks of one node) build once and share the result.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from .errors import DatasetError
from .indexed import IndexedDataset, check_vocab
from .preprocess import preprocess
from .tokenizer import Tokenizer, TokenizerError, train_tokenizer

CACHE_FORMAT = 1  # bump when tokenizer settings or the dataset format change: invalidates caches
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Prepared:
    tokenizer_path: Optional[str]
    train: list = field(default_factory=list)     # [(prefix, weight)]
    valid: str = ""
    built: bool = False                            # True when this call built the cache


def resolve_corpus(patterns: list) -> list[str]:
    """Expand globs relative to the cwd, falling back to the repo root (so the bundled corpus is
    found from any directory). Sorted, de-duplicated absolute paths."""
    files: set[str] = set()
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        hits = glob.glob(pat, recursive=True)
        if not hits and not os.path.isabs(pat):
            hits = glob.glob(os.path.join(REPO_ROOT, pat), recursive=True)
        if not hits:
            raise DatasetError(f"data.corpus entry {pat!r} matches no file (looked in {os.getcwd()} and "
                               f"{REPO_ROOT}). Point data.corpus at .txt/.jsonl(.gz) files")
        files.update(os.path.abspath(h) for h in hits if os.path.isfile(h))
    if not files:
        raise DatasetError(f"data.corpus {patterns} matches no files")
    return sorted(files)


def _check_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size:
        raise TokenizerError(f"tokenizer {path} has {tok.vocab_size} tokens but model.vocab_size={vocab_size}: "
                             f"set model.vocab_size={tok.vocab_size}, or train a tokenizer with "
                             f"`megaloop tokenizer --vocab-size {vocab_size}`")
    return tok


def _check_datasets(train: list, valid: str, vocab_size: int, tok: Optional[Tokenizer]) -> None:
    for prefix in [p for p, _ in train] + [valid]:
        check_vocab(IndexedDataset(prefix), vocab_size, tok.fingerprint if tok else None)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_key(files: list[str], vocab_size: int, tokenizer_type: str, valid_fraction: float,
              text_key: str, tokenizer: Optional[Tokenizer]) -> str:
    meta = {"format": CACHE_FORMAT, "vocab_size": vocab_size, "valid_fraction": valid_fraction,
            "text_key": text_key,
            "tokenizer": f"given:{tokenizer.fingerprint:016x}" if tokenizer else f"train:{tokenizer_type}",
            "files": [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def ensure_prepared(data_cfg, vocab_size: int, log: Callable[[str], None] = print) -> Prepared:
    """Return ready tokenizer and datasets for `data_cfg` (a megaloop.config.DataConfig)."""
    given_train, given_valid = data_cfg.train, data_cfg.valid
    tok = _check_tokenizer(data_cfg.tokenizer, vocab_size) if data_cfg.tokenizer else None

    if given_train is not None or given_valid is not None:
        if not given_train or not given_valid:
            raise DatasetError("set both data.train and data.valid (dataset PREFIXes built by `megaloop "
                               "preprocess`), or neither to build them from data.corpus")
        train = []
        for item in given_train:
            path, w = (item, 1.0) if isinstance(item, str) else (item["path"], float(item.get("weight", 1.0)))
            train.append((path, w))
        _check_datasets(train, given_valid, vocab_size, tok)
        return Prepared(data_cfg.tokenizer, train, given_valid, built=False)

    files = resolve_corpus(list(data_cfg.corpus))
    key = cache_key(files, vocab_size, data_cfg.tokenizer_type, data_cfg.valid_fraction, data_cfg.text_key, tok)
    cache_root = os.path.abspath(data_cfg.cache_dir)
    final = os.path.join(cache_root, key)
    tok_path = data_cfg.tokenizer or os.path.join(final, "tokenizer.model")
    result = Prepared(tok_path, [(os.path.join(final, "train"), 1.0)], os.path.join(final, "valid"))
    os.makedirs(cache_root, exist_ok=True)

    with _locked(os.path.join(cache_root, f"{key}.lock")):
        if os.path.isfile(os.path.join(final, "DONE")):
            log(f"data: using cached datasets in {final}")
            _check_datasets(result.train, result.valid, vocab_size, tok or Tokenizer(tok_path))
            return result
        if os.path.exists(final):  # not complete, so never trusted: built by hand or an old bug
            shutil.rmtree(final)
        tmp = os.path.join(cache_root, f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            t0 = time.perf_counter()
            if tok is None:
                log(f"data: training a {vocab_size}-token {data_cfg.tokenizer_type} tokenizer on {len(files)} "
                    f"file(s)")
                model = train_tokenizer(files, os.path.join(tmp, "tokenizer"), vocab_size,
                                        data_cfg.tokenizer_type, text_key=data_cfg.text_key)
            else:
                model = data_cfg.tokenizer
            t1 = time.perf_counter()
            stats = preprocess(files, model, tmp, data_cfg.valid_fraction, data_cfg.workers, data_cfg.text_key,
                               log=log)
            t2 = time.perf_counter()
            with open(os.path.join(tmp, "DONE"), "w") as f:
                json.dump({"files": files, "vocab_size": vocab_size, "tokenizer_type": data_cfg.tokenizer_type,
                           "valid_fraction": data_cfg.valid_fraction, "stats": vars(stats),
                           "tokenizer_s": round(t1 - t0, 2), "preprocess_s": round(t2 - t1, 2)}, f, indent=1)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"data: built {final} (tokenizer {t1 - t0:.1f}s, datasets {t2 - t1:.1f}s)")
    result.built = True
    return result
