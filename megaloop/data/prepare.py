"""From a `DataConfig` to ready datasets: validate given files, or build and cache from the corpus.

Cache layout: data.cache_dir/<key>/{tokenizer.model, train.bin/.idx, valid.bin/.idx, DONE}, where
key hashes everything the result depends on: the corpus files' contents (size and hash, in path
order; not their paths or mtimes, so a fresh clone, a moved corpus or a `touch` reuses the cache),
vocab size, tokenizer type or given tokenizer, valid fraction, text key, format version. File
hashes are memoised in cache_dir/corpus_hashes.json by (path, size, mtime, ctime, inode), so an
unchanged corpus is not re-read. A build happens in a temporary directory that is renamed into
place only after DONE is written, so a crash never leaves a half-built cache that a later run
would trust. A file lock makes concurrent callers (e.g. the ranks of one node) build once and
share the result; its holder removes the lock file, and the temporary folders of killed builds,
so no failed build leaves files behind.
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

from .documents import FORMATS_HINT, source_files
from .errors import DatasetError
from .indexed import check_vocab
from .token_files import open_dataset
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
    found from any directory). Sorted, de-duplicated absolute paths of files and folders (a folder
    of shards or a saved `datasets` folder is one entry: documents.expand_sources reads it)."""
    files: set[str] = set()
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        hits = glob.glob(pat, recursive=True)
        if not hits and not os.path.isabs(pat):
            hits = glob.glob(os.path.join(REPO_ROOT, pat), recursive=True)
        if not hits:
            raise DatasetError(f"data.corpus entry {pat!r} matches no file (looked in {os.getcwd()} and "
                               f"{REPO_ROOT}). Point data.corpus at {FORMATS_HINT}")
        files.update(os.path.abspath(h) for h in hits if os.path.isfile(h) or os.path.isdir(h))
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
        check_vocab(open_dataset(prefix), vocab_size, tok.fingerprint if tok else None)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on `path` that leaves no file behind. The holder removes the file before
    it unlocks; a waiter that then gets the lock on the removed file sees that the path no longer
    names the file it locked, and tries again on the new one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _content_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """Content hashes of corpus files, remembered by (path, size, mtime, ctime, inode) in
    cache_root/corpus_hashes.json, so only new or modified files are read. Saved only after a
    successful preparation: a failed build writes nothing."""

    def __init__(self, cache_root: str):
        self.path = os.path.join(cache_root, "corpus_hashes.json")
        try:
            with open(self.path) as f:
                self.memo = json.load(f)
        except (OSError, ValueError):
            self.memo = {}
        self.changed = False

    def digests(self, files: list[str]) -> list[tuple[int, str]]:
        out = []
        for path in files:
            st = os.stat(path)
            ident = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
            hit = self.memo.get(path)
            if not (isinstance(hit, list) and len(hit) == 2 and hit[0] == ident):
                hit, self.changed = [ident, _content_hash(path)], True
                self.memo[path] = hit
            out.append((st.st_size, hit[1]))
        return out

    def save(self) -> None:
        if not self.changed:
            return
        try:
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.memo, f)
            os.replace(tmp, self.path)
        except OSError:  # only a speed-up: a read-only cache still works
            pass


def cache_key(digests: list, vocab_size: int, tokenizer_type: str, valid_fraction: float,
              text_key: str, tokenizer: Optional[Tokenizer], split: str = "train") -> str:
    """`digests`: (size, content hash) per corpus file, in path order (HashMemo.digests)."""
    meta = {"format": CACHE_FORMAT, "vocab_size": vocab_size, "valid_fraction": valid_fraction,
            "text_key": text_key,
            "tokenizer": f"given:{tokenizer.fingerprint:016x}" if tokenizer else f"train:{tokenizer_type}",
            "files": [list(d) for d in digests]}
    if split != "train":  # only then, so the keys of existing caches stay as they were
        meta["split"] = split
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

    split = getattr(data_cfg, "split", "train")
    files = resolve_corpus(list(data_cfg.corpus))
    cache_root = os.path.abspath(data_cfg.cache_dir)
    hashes = HashMemo(cache_root)
    # A folder's key is every file under it (a folder of shards: the shards of every split).
    key = cache_key(hashes.digests([f for src in files for f in source_files(src)]), vocab_size,
                    data_cfg.tokenizer_type, data_cfg.valid_fraction, data_cfg.text_key, tok, split)
    final = os.path.join(cache_root, key)
    tok_path = data_cfg.tokenizer or os.path.join(final, "tokenizer.model")
    result = Prepared(tok_path, [(os.path.join(final, "train"), 1.0)], os.path.join(final, "valid"))
    os.makedirs(cache_root, exist_ok=True)

    with _locked(os.path.join(cache_root, f"{key}.lock")):
        if os.path.isfile(os.path.join(final, "DONE")):
            log(f"data: using cached datasets in {final}")
            _check_datasets(result.train, result.valid, vocab_size, tok or Tokenizer(tok_path))
            hashes.save()
            return result
        if os.path.exists(final):  # not complete, so never trusted: built by hand or an old bug
            shutil.rmtree(final)
        for name in os.listdir(cache_root):  # builds of this key that were killed (we hold its lock)
            if name.startswith(f".tmp-{key}-"):
                shutil.rmtree(os.path.join(cache_root, name), ignore_errors=True)
        tmp = os.path.join(cache_root, f".tmp-{key}-{os.getpid()}")
        os.makedirs(tmp)
        try:
            t0 = time.perf_counter()
            if tok is None:
                log(f"data: training a {vocab_size}-token {data_cfg.tokenizer_type} tokenizer on {len(files)} "
                    f"file(s)")
                model = train_tokenizer(files, os.path.join(tmp, "tokenizer"), vocab_size,
                                        data_cfg.tokenizer_type, text_key=data_cfg.text_key, split=split)
            else:
                model = data_cfg.tokenizer
            t1 = time.perf_counter()
            stats = preprocess(files, model, tmp, data_cfg.valid_fraction, data_cfg.workers, data_cfg.text_key,
                               log=log, split=split)
            t2 = time.perf_counter()
            with open(os.path.join(tmp, "DONE"), "w") as f:
                json.dump({"files": files, "vocab_size": vocab_size, "tokenizer_type": data_cfg.tokenizer_type,
                           "valid_fraction": data_cfg.valid_fraction, "stats": vars(stats),
                           "tokenizer_s": round(t1 - t0, 2), "preprocess_s": round(t2 - t1, 2)}, f, indent=1)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        hashes.save()
    log(f"data: built {final} (tokenizer {t1 - t0:.1f}s, datasets {t2 - t1:.1f}s)")
    result.built = True
    return result
