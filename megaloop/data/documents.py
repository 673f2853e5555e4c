"""Reading raw text corpora as a stream of documents.

Formats (gzip allowed for each, by the `.gz` suffix):
  * `.txt`   : UTF-8 text; documents are separated by a line holding only a form feed
               (`\\n\\f\\n`). A file without a form feed is one document.
  * `.jsonl` : one JSON object per line; the document is the string under `text_key`.
Newlines are read universally (\\r\\n -> \\n) and a UTF-8 byte-order mark is dropped; nothing
else is changed, so the tokenizer sees the text exactly as written.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from typing import IO, Iterable, Iterator

from .errors import DatasetError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")
DOC_SEPARATOR = "\n\f\n"


def check_input_files(files: Iterable[str]) -> list[str]:
    """Return the files as a list, or raise DatasetError naming the first unusable one."""
    out = []
    for f in files:
        f = os.fspath(f)
        if not os.path.isfile(f):
            raise DatasetError(f"input file not found: {f}. Check the path (globs must match at least one file)")
        if not f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise DatasetError(
                f"{f}: unknown input format. Use .txt or .jsonl files (optionally gzipped: .txt.gz, .jsonl.gz)")
        out.append(f)
    if not out:
        raise DatasetError("no input files given: pass at least one .txt/.jsonl(.gz) file")
    return out


def _open_text(path: str) -> IO[str]:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    # utf-8-sig drops a byte-order mark; errors='strict' so bad bytes are reported, not mangled.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline=None)


def split_txt(text: str) -> list[str]:
    """Split a .txt file's content at form feeds; the newline on each side of one belongs to it."""
    parts = text.split("\f")
    last = len(parts) - 1
    out = []
    for i, p in enumerate(parts):
        if i > 0 and p.startswith("\n"):
            p = p[1:]
        if i < last and p.endswith("\n"):
            p = p[:-1]
        if p:
            out.append(p)
    return out


def iter_file_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one file, in order. Empty documents are skipped."""
    try:
        with _open_text(path) as f:
            if path.endswith(TEXT_SUFFIXES):
                # Form-feed separated documents are small; a whole file in memory is fine for
                # .txt (large corpora should use .jsonl, which streams line by line).
                yield from split_txt(f.read())
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg}). Each line of a .jsonl "
                                       f"file must be one JSON object like {{\"{text_key}\": \"...\"}}") from None
                if not isinstance(obj, dict) or text_key not in obj:
                    raise DatasetError(f"{path}:{lineno}: no \"{text_key}\" field. Set the JSON key holding the "
                                       f"text with --text-key (or data.text_key)")
                text = obj[text_key]
                if not isinstance(text, str):
                    raise DatasetError(f"{path}:{lineno}: \"{text_key}\" is {type(text).__name__}, expected a string")
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start}). "
                           f"Convert the file to UTF-8") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot be read ({e}). Is it a truncated or corrupt file?") from None


def iter_documents(files: Iterable[str], text_key: str = "text") -> Iterator[str]:
    """All documents of all files, in the given file order."""
    for path in check_input_files(files):
        yield from iter_file_documents(path, text_key)


def files_without_text(files: Iterable[str], text_key: str = "text") -> list[str]:
    """The files that hold no document (empty, or only blank lines): named when a corpus turns out
    to have no text at all."""
    return [f for f in files if next(iter_file_documents(f, text_key), None) is None]


def no_text_error(files: list[str], text_key: str = "text") -> DatasetError:
    empty = files_without_text(files, text_key)
    if not empty:
        return DatasetError(f"the input files hold no text: {', '.join(files)}")
    return DatasetError(f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (no text). Put documents "
                        f"in {'it' if len(empty) == 1 else 'them'} or leave {'it' if len(empty) == 1 else 'them'} "
                        f"out of the corpus")
