"""Shared fixtures: a tiny text corpus and a tiny training config that runs in seconds on CPU."""
import gzip
import os
import random

import pytest

WORDS = ("the king queen castle night sword love death crown heart speak lord lady honour fair "
         "sweet time world friend blood hand eye fool good noble true man woman war peace").split()


def write_corpus(folder, n_docs=60, seed=0):
    """Deterministic pseudo-English documents with some structure, gzip-compressed."""
    rng = random.Random(seed)
    vocab = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                     for _ in range(400)]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tiny.txt.gz")
    docs = []
    for d in range(n_docs):
        lines = []
        for _ in range(rng.randint(8, 20)):
            w = [rng.choice(vocab) for _ in range(rng.randint(4, 12))]
            lines.append(" ".join(w).capitalize() + rng.choice([".", "!", "?", ","]))
        docs.append(f"Document {d}\n\n" + "\n".join(lines))
    with gzip.open(path, "wt") as f:
        f.write("\n\f\n".join(docs))  # form feed line = document boundary
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny_raw(corpus, cache, run_dir, **train):
    t = dict(steps=6, micro_batch_size=4, grad_accum=1, seed=3, run_dir=run_dir, log_every=1,
             eval_tokens=512, save_every=0, progress=False)
    t.update(train)
    return {
        "model": dict(d_model=32, n_head=2, vocab_size=384, seq_len=32, n_prelude=1, n_recur_block=1,
                      n_coda=1, num_recur=2),
        "optim": dict(name="muon", lr=0.02, warmup_steps=2),
        "train": t,
        "data": dict(corpus=[corpus], cache_dir=cache, workers=1, valid_fraction=0.1),
    }
