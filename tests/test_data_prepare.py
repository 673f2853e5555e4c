"""ensure_prepared contracts: build once then reuse, never trust a half-built cache, clear errors."""
from __future__ import annotations

import gzip
import os

import pytest

from megaloop.config import DataConfig
from megaloop.data.errors import DatasetError, TokenizerError
from megaloop.data.indexed import IndexedDataset
from megaloop.data.prepare import ensure_prepared, resolve_corpus
from megaloop.data.preprocess import preprocess
from megaloop.data.tokenizer import Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 400


@pytest.fixture
def corpus_dir(tmp_path):
    with gzip.open(os.path.join(REPO, "data", "corpus", "shakespeare_passionate_pilgrim.txt.gz"), "rt") as f:
        text = f.read().replace("\f", "")
    paras = [p for p in text.split("\n\n") if p.strip()]
    d = tmp_path / "corpus"
    d.mkdir()
    for k in range(2):
        part = paras[k::2]
        (d / f"part{k}.txt").write_text("\n\f\n".join(p + "\n" for p in part))
    return d


def _cfg(corpus_dir, tmp_path, **kw) -> DataConfig:
    base = dict(corpus=[str(corpus_dir / "*.txt")], cache_dir=str(tmp_path / "cache"), tokenizer_type="bpe",
                valid_fraction=0.1, workers=1)
    base.update(kw)
    return DataConfig(**base)


def test_builds_once_then_reuses(corpus_dir, tmp_path) -> None:
    """First call builds tokenizer + datasets (built=True); the second reuses them untouched;
    changing a corpus file builds a new cache entry."""
    logs: list[str] = []
    cfg = _cfg(corpus_dir, tmp_path)
    p1 = ensure_prepared(cfg, VOCAB, log=logs.append)
    assert p1.built and Tokenizer(p1.tokenizer_path).vocab_size == VOCAB
    assert [w for _, w in p1.train] == [1.0]
    for prefix in (p1.train[0][0], p1.valid):
        assert IndexedDataset(prefix).vocab_size == VOCAB
    entry = os.path.dirname(p1.valid)
    assert os.path.isfile(os.path.join(entry, "DONE"))
    assert not [n for n in os.listdir(tmp_path / "cache") if n.startswith(".tmp")]
    stamp = os.stat(p1.valid + ".bin").st_mtime_ns
    p2 = ensure_prepared(cfg, VOCAB, log=logs.append)
    assert not p2.built and (p2.train, p2.valid, p2.tokenizer_path) == (p1.train, p1.valid, p1.tokenizer_path)
    assert os.stat(p2.valid + ".bin").st_mtime_ns == stamp
    with open(corpus_dir / "part0.txt", "a") as f:
        f.write("\n\f\nA new document.\n")
    p3 = ensure_prepared(cfg, VOCAB, log=logs.append)
    assert p3.built and p3.valid != p1.valid


def test_cache_is_keyed_on_content(corpus_dir, tmp_path) -> None:
    """The cache key is the corpus content (size and hash per file), not paths or mtimes: a
    `touch`, or the same files in another folder (a fresh clone), reuse the cache; a changed byte
    of the same size builds a new entry. Unchanged files are not re-hashed (the memo is used)."""
    import shutil
    import time

    from megaloop.data import prepare
    cfg = _cfg(corpus_dir, tmp_path)
    p1 = ensure_prepared(cfg, VOCAB, log=lambda s: None)
    time.sleep(0.01)
    os.utime(corpus_dir / "part0.txt")  # touch: a new mtime
    p2 = ensure_prepared(cfg, VOCAB, log=lambda s: None)
    assert not p2.built and p2.valid == p1.valid
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus_dir, moved)
    p3 = ensure_prepared(_cfg(moved, tmp_path), VOCAB, log=lambda s: None)
    assert not p3.built and p3.valid == p1.valid
    real, calls = prepare._content_hash, []
    prepare._content_hash = lambda path: calls.append(path) or real(path)
    try:
        ensure_prepared(_cfg(moved, tmp_path), VOCAB, log=lambda s: None)
        assert calls == []  # the memo knows every file
        data = (moved / "part1.txt").read_bytes()
        (moved / "part1.txt").write_bytes(data[:-2] + (b"x" if data[-2:-1] != b"x" else b"y") + data[-1:])
        p4 = ensure_prepared(_cfg(moved, tmp_path), VOCAB, log=lambda s: None)
    finally:
        prepare._content_hash = real
    assert calls == [str(moved / "part1.txt")] and p4.built and p4.valid != p1.valid


def test_failed_build_leaves_nothing_behind(corpus_dir, tmp_path) -> None:
    """A build that fails (here: invalid JSON on line 2) leaves no lock file, no temporary folder
    and no hash memo in the cache; the temporary folder of a build that was killed is removed by
    the next build of the same key, and a successful build leaves no lock file either."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "c.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="c.jsonl:2: not valid JSON"):
        ensure_prepared(_cfg(bad, tmp_path, corpus=[str(bad / "c.jsonl")]), VOCAB, log=lambda s: None)
    assert os.listdir(cache) == []
    cfg = _cfg(corpus_dir, tmp_path)
    p1 = ensure_prepared(cfg, VOCAB, log=lambda s: None)
    key = os.path.basename(os.path.dirname(p1.valid))
    os.remove(os.path.join(cache, key, "DONE"))
    stale = cache / f".tmp-{key}-999999"  # a build of this key that was SIGKILLed
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"partial")
    ensure_prepared(cfg, VOCAB, log=lambda s: None)
    assert sorted(os.listdir(cache)) == sorted([key, "corpus_hashes.json"])


def test_half_built_cache_is_not_trusted(corpus_dir, tmp_path) -> None:
    """A cache entry without its DONE marker (a crash mid-build) is rebuilt, not used."""
    cfg = _cfg(corpus_dir, tmp_path)
    p1 = ensure_prepared(cfg, VOCAB, log=lambda s: None)
    entry = os.path.dirname(p1.valid)
    os.remove(os.path.join(entry, "DONE"))
    with open(p1.valid + ".bin", "r+b") as f:
        f.truncate(2)
    p2 = ensure_prepared(cfg, VOCAB, log=lambda s: None)
    assert p2.built and p2.valid == p1.valid
    IndexedDataset(p2.valid, full_check=True)


def test_corpus_globs(corpus_dir, tmp_path, monkeypatch) -> None:
    """Relative globs resolve from the cwd, else from the repo root (the bundled corpus works from
    anywhere); a glob that matches nothing is a DatasetError naming it."""
    monkeypatch.chdir(tmp_path)
    files = resolve_corpus(["data/corpus/*.txt.gz"])
    assert len(files) >= 40 and all(f.startswith(REPO) for f in files)
    assert resolve_corpus(["corpus/*.txt"]) == sorted(str(p) for p in corpus_dir.glob("*.txt"))
    with pytest.raises(DatasetError, match="nothing/here"):
        ensure_prepared(_cfg(corpus_dir, tmp_path, corpus=["nothing/here/*.txt"]), VOCAB)


def test_given_files_are_validated(corpus_dir, tmp_path) -> None:
    """Given tokenizer/datasets: missing files and vocab mismatches raise errors naming the file and
    the fix; matching ones are returned as is, with their weights."""
    files = sorted(str(p) for p in corpus_dir.glob("*.txt"))
    model = train_tokenizer(files, str(tmp_path / "tok"), VOCAB, "bpe")
    preprocess(files, model, str(tmp_path / "ds"), valid_fraction=0.2, workers=1)
    train, valid = str(tmp_path / "ds" / "train"), str(tmp_path / "ds" / "valid")
    ok = DataConfig(tokenizer=model, train=[{"path": train, "weight": 2.0}], valid=valid)
    p = ensure_prepared(ok, VOCAB, log=lambda s: None)
    assert (p.tokenizer_path, p.train, p.valid, p.built) == (model, [(train, 2.0)], valid, False)

    with pytest.raises(TokenizerError, match="missing.model.*megaloop tokenizer"):
        ensure_prepared(DataConfig(tokenizer=str(tmp_path / "missing.model"), train=[train], valid=valid), VOCAB)
    with pytest.raises(TokenizerError, match="model.vocab_size=512"):
        ensure_prepared(DataConfig(tokenizer=model, train=[train], valid=valid), 512)
    with pytest.raises(DatasetError, match=r"nope\.idx.*megaloop preprocess"):
        ensure_prepared(DataConfig(train=[{"path": str(tmp_path / "nope"), "weight": 1.0}], valid=valid), VOCAB)
    with pytest.raises(DatasetError, match="model.vocab_size=512"):
        ensure_prepared(DataConfig(train=[train], valid=valid), 512)
    with pytest.raises(DatasetError, match="data.valid"):
        ensure_prepared(DataConfig(train=[train]), VOCAB)


def test_lock_excludes_and_leaves_no_file(tmp_path) -> None:
    """The cache lock still excludes concurrent holders although each holder removes the lock
    file on release (waiters that locked a removed file retry on the new one)."""
    import threading
    import time

    from megaloop.data.prepare import _locked
    path = str(tmp_path / "k.lock")
    inside, overlaps = [], []

    def worker() -> None:
        for _ in range(20):
            with _locked(path):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(1)
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and not os.path.exists(path)
