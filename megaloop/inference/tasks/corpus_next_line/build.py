#!/usr/bin/env python
"""Build corpus_next_line/test.jsonl from the bundled public-domain corpus (data/corpus).

    python megaloop/inference/tasks/corpus_next_line/build.py [--corpus 'data/corpus/*.txt.gz']

Each example: up to 6 consecutive lines of a work (context), then four candidate next lines:
the true one and three lines of similar length from other documents. Only documents of the
validation split of the default config (valid_fraction 0.05, megaloop.data.preprocess's
content hash) are used, so a model trained on the default split has not seen the answers.
Deterministic: the same corpus gives the same file, byte for byte.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random

from megaloop.data.documents import iter_documents
from megaloop.data.preprocess import assign_split

HERE = os.path.dirname(os.path.abspath(__file__))
N_EXAMPLES, CONTEXT_LINES, N_CHOICES, SEED = 200, 6, 4, 20261201
MIN_CHARS = 20  # a candidate line is real text, not a speaker's name or a stage direction


def content_lines(doc: str) -> list[str]:
    return [ln for ln in doc.split("\n") if ln.strip()]


def build(files: list[str], valid_fraction: float = 0.05) -> list[dict]:
    docs = [d for d, v in zip(iter_documents(files), assign_split(files, "text", valid_fraction)) if v]
    rng = random.Random(SEED)
    lines = [content_lines(d) for d in docs]
    pool = [(i, ln.strip()) for i, ls in enumerate(lines) for ln in ls if len(ln.strip()) >= MIN_CHARS]
    slots = [(i, j) for i, ls in enumerate(lines) for j in range(CONTEXT_LINES, len(ls))
             if len(ls[j].strip()) >= MIN_CHARS]
    rng.shuffle(slots)
    out = []
    for i, j in slots:
        gold = lines[i][j].strip()
        near = [ln for d, ln in pool if d != i and 0.7 * len(gold) <= len(ln) <= 1.3 * len(gold) and ln != gold]
        if len(near) < N_CHOICES - 1:
            continue
        choices = rng.sample(sorted(set(near)), N_CHOICES - 1) + [gold]
        rng.shuffle(choices)
        out.append({"context": "\n".join(lines[i][j - CONTEXT_LINES:j]), "choices": choices,
                    "label": choices.index(gold), "doc": i})
        if len(out) == N_EXAMPLES:
            break
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus/*.txt.gz")
    ap.add_argument("--out", default=os.path.join(HERE, "test.jsonl"))
    args = ap.parse_args()
    rows = build(sorted(glob.glob(args.corpus)))
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} examples -> {args.out}")


if __name__ == "__main__":
    main()
