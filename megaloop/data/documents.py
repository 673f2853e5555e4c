"""Reading raw text corpora as a stream of documents, in bounded memory.

A corpus is a list of *sources*. A source is a file or a folder:
  * `.txt`   : UTF-8 text; documents are separated by a line holding only a form feed
               (`\\n\\f\\n`). A file without a form feed is one document.
  * `.jsonl` : one JSON object per line; the document is the string under `text_key`.
  * either of them compressed: `.gz` (gzip) or `.zst` (zstandard), streamed.
  * `.parquet`: the string column `text_key`, read a batch of rows at a time (never a whole
               shard or row group in memory).
  * a folder saved by `datasets.Dataset.save_to_disk` (or a DatasetDict: `split` picks one).
  * any other folder: its data files, in the Hugging Face hub's layout. Files named after a split
               (`train-00000-of-00004.parquet`, `data/test/...`) belong to that split and `split`
               picks them; a folder without split names (FineWeb-Edu's `sample/10BT/*.parquet`)
               is all `train`. The `datasets` library decides which file is which split.
Newlines are read universally (\\r\\n and \\r -> \\n) and a UTF-8 byte-order mark is dropped;
nothing else is changed, so the tokenizer sees the text exactly as written. Empty documents
(and null parquet cells) are skipped and counted in `ReadStats`.

pyarrow, zstandard and datasets are optional (the `data` extra): imported when a source needs
them, with an error naming the extra when they are missing.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import IO, Iterable, Iterator, Optional

from .errors import DatasetError

COMPRESSIONS = ("", ".gz", ".zst")
TEXT_SUFFIXES = tuple(".txt" + c for c in COMPRESSIONS)
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".json", ".ndjson") for c in COMPRESSIONS if s + c != ".json")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
DOC_SEPARATOR = "\n\f\n"
PARQUET_BATCH_ROWS = 1024
FORMATS_HINT = (".txt, .jsonl (optionally .gz or .zst compressed), .parquet files, or folders of them / "
                "saved with datasets' save_to_disk")


def optional_import(module: str, what: str):
    """Import an optional dependency, or raise DatasetError naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetError(f"{what} needs the `{module.split('.')[0]}` package: install megaloop's data extra "
                           f"(`pip install -e .[data]`, or ./setup.sh --dev)") from None


@dataclass
class ReadStats:
    """Counts kept while reading: documents yielded and empty ones skipped."""
    documents: int = 0
    empty_skipped: int = 0


# ------------------------------------------------------------------ sources

def is_saved_dataset(path: str) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def folder_files(folder: str, split: str = "train") -> list[str]:
    """The data files of `split` in a folder of shards, by the hub's naming conventions."""
    data_files = optional_import("datasets.data_files", f"reading the folder {folder}")
    try:
        patterns = {str(k): v for k, v in data_files.get_data_patterns(folder).items()}
    except Exception:  # the library raises EmptyDatasetError (and others) when nothing matches
        patterns = {}
    if not patterns:
        raise DatasetError(f"{folder}: no data files in this folder. Put {FORMATS_HINT} in it")
    if split not in patterns:
        raise DatasetError(f"{folder}: no split {split!r} in this folder (it has {', '.join(sorted(patterns))}). "
                           f"Set data.split (or --split) to one of them")
    resolved = data_files.DataFilesDict.from_patterns({split: patterns[split]}, base_path=folder)[split]
    files = sorted(os.path.abspath(f) for f in resolved if str(f).endswith(FILE_SUFFIXES))
    if not files:
        raise DatasetError(f"{folder}: the {split!r} split holds no readable file. megaloop reads {FORMATS_HINT}")
    return files


def expand_sources(items: Iterable[str], split: str = "train") -> list[str]:
    """Files stay files; a saved `datasets` folder stays one source; any other folder becomes its
    data files of `split`. Raises DatasetError naming the first unusable item."""
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            out.extend([item] if is_saved_dataset(item) else folder_files(item, split))
        elif not os.path.isfile(item):
            raise DatasetError(f"input file not found: {item}. Check the path (globs must match at least one file)")
        elif not item.endswith(FILE_SUFFIXES):
            raise DatasetError(f"{item}: unknown input format. Use {FORMATS_HINT}")
        else:
            out.append(item)
    if not out:
        raise DatasetError(f"no input files given: pass at least one of {FORMATS_HINT}")
    check_parquet_schemas([f for f in out if f.endswith(PARQUET_SUFFIXES)])
    return out


def check_input_files(files: Iterable[str], split: str = "train") -> list[str]:
    """Alias of expand_sources kept for callers that name files."""
    return expand_sources(files, split)


def source_files(source: str) -> list[str]:
    """The files whose content defines a source (what a cache key must hash)."""
    if not os.path.isdir(source):
        return [source]
    out = []
    for root, dirs, names in os.walk(source):
        dirs.sort()
        out.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    return out


# ------------------------------------------------------------------ parquet

def _parquet_file(path: str):
    pq = optional_import("pyarrow.parquet", f"reading {path}")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid / OSError on a corrupt or truncated footer
        raise DatasetError(f"{path}: not a readable parquet file ({e}). It is truncated or corrupt: download "
                           f"or write it again") from None


def check_parquet_schemas(files: list[str]) -> None:
    """All parquet shards of a corpus share one schema (a mix means shards of different datasets)."""
    first, first_schema = None, None
    for f in files:
        schema = _parquet_file(f).schema_arrow.remove_metadata()
        if first is None:
            first, first_schema = f, schema
        elif not schema.equals(first_schema):
            a = {n: str(t) for n, t in zip(first_schema.names, first_schema.types)}
            b = {n: str(t) for n, t in zip(schema.names, schema.types)}
            diff = sorted(set(a.items()) ^ set(b.items()))
            raise DatasetError(f"{f}: its schema differs from {first}'s ({', '.join(f'{n}: {t}' for n, t in diff)}). "
                               f"Shards of one corpus must share a schema: list the shards of each dataset "
                               f"separately, or convert them to one schema")


def _iter_parquet(path: str, text_key: str, stats: ReadStats) -> Iterator[str]:
    pf = _parquet_file(path)
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DatasetError(f"{path}: no column {text_key!r} (its columns: {', '.join(schema.names)}). Set "
                           f"data.text_key (or --text-key) to the column holding the text")
    kind = str(schema.field(text_key).type)
    if kind not in ("string", "large_string", "string_view", "binary", "large_binary"):
        raise DatasetError(f"{path}: column {text_key!r} holds {kind}, not text. Set data.text_key (or "
                           f"--text-key) to the column holding the text")
    row = 0
    for group in range(pf.metadata.num_row_groups):
        # One row group at a time, a batch of rows at a time: memory is one batch, and a bad
        # page is reported with its row group.
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_key],
                                  use_threads=False)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a corrupt page, or a file cut short
                raise DatasetError(f"{path}: row group {group} cannot be read ({str(e).strip()}). The file is "
                                   f"truncated or corrupt: download or write it again") from None
            if batch is None:
                break
            yield from _batch_texts(path, group, row, batch.column(0), kind, stats)
            row += batch.num_rows


def _batch_texts(path: str, group: int, row: int, col, kind: str, stats: ReadStats) -> Iterator[str]:
    if kind.endswith("binary"):
        values = col.to_pylist()
        for j, v in enumerate(values):
            if v is not None:
                try:
                    values[j] = v.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"{path}: row {row + j} (row group {group}) is not valid UTF-8 ({e.reason} "
                                       f"at byte {e.start}). Convert the text to UTF-8") from None
    else:
        try:
            col.validate(full=True)
        except Exception as e:
            raise DatasetError(f"{path}: row group {group} holds text that is not valid UTF-8 ({e}). Convert the "
                               f"text to UTF-8") from None
        values = col.to_pylist()
    for v in values:
        if v:
            stats.documents += 1
            yield v
        else:
            stats.empty_skipped += 1


# ------------------------------------------------------------------ datasets save_to_disk

def _iter_saved_dataset(path: str, text_key: str, split: str, stats: ReadStats) -> Iterator[str]:
    datasets = optional_import("datasets", f"reading the saved dataset {path}")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DatasetError(f"{path}: not a readable saved dataset ({e}). Save it again with "
                           f"Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(f"{path}: no split {split!r} in this dataset (it has {', '.join(sorted(ds))}). "
                               f"Set data.split (or --split) to one of them")
        ds = ds[split]
    if text_key not in ds.column_names:
        raise DatasetError(f"{path}: no column {text_key!r} (its columns: {', '.join(ds.column_names)}). Set "
                           f"data.text_key (or --text-key) to the column holding the text")
    for batch in ds.select_columns([text_key]).iter(batch_size=PARQUET_BATCH_ROWS):
        for v in batch[text_key]:
            if isinstance(v, str) and v:
                stats.documents += 1
                yield v
            elif v is None or v == "":
                stats.empty_skipped += 1
            else:
                raise DatasetError(f"{path}: column {text_key!r} holds {type(v).__name__}, not text. Set "
                                   f"data.text_key (or --text-key) to the column holding the text")


# ------------------------------------------------------------------ text and JSON lines

def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


class _ZstdReader(io.RawIOBase):
    """A zstandard file (one or more frames) decompressed as a stream. Unlike the library's
    stream_reader, a file that ends inside a frame is an error, not a silent short read."""

    def __init__(self, path: str):
        self.zstd = optional_import("zstandard", f"reading {path}")
        self.path, self.raw = path, open(path, "rb")
        self.dobj, self.fed = self.zstd.ZstdDecompressor().decompressobj(), False
        self.pending, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.pos >= len(self.pending):
            self.pending, self.pos = b"", 0
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.fed and not self.dobj.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            while chunk:
                self.fed = True
                self.pending += self.dobj.decompress(chunk)
                chunk = self.dobj.unused_data if self.dobj.eof else b""
                if self.dobj.eof:  # a new frame may follow (concatenated or multi-frame files)
                    self.dobj, self.fed = self.zstd.ZstdDecompressor().decompressobj(), False
        n = min(len(buf), len(self.pending) - self.pos)
        buf[:n] = memoryview(self.pending)[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _decoded_lines(path: str, f: IO[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text) with universal newlines; a bad byte names its line."""
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line). "
                               f"Convert the file to UTF-8") from None
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if "\r" in line:
            line = line.replace("\r\n", "\n").replace("\r", "\n")
        yield lineno, line


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


def _iter_txt(lines: Iterator[tuple[int, str]], stats: ReadStats) -> Iterator[str]:
    """split_txt on a stream: the same documents, holding one document at a time."""
    buf: list[str] = []
    first = True

    def emit(part: str, is_last: bool) -> Optional[str]:
        if not first and part.startswith("\n"):
            part = part[1:]
        if not is_last and part.endswith("\n"):
            part = part[:-1]
        return part

    for _, line in lines:
        if "\f" not in line:
            buf.append(line)
            continue
        pieces = line.split("\f")
        for piece in pieces[:-1]:
            buf.append(piece)
            doc = emit("".join(buf), False)
            first = False
            buf = []
            if doc:
                stats.documents += 1
                yield doc
            else:
                stats.empty_skipped += 1
        buf = [pieces[-1]]
    doc = emit("".join(buf), True)
    if doc:
        stats.documents += 1
        yield doc
    elif not first:
        stats.empty_skipped += 1


def _iter_jsonl(path: str, lines: Iterator[tuple[int, str]], text_key: str, stats: ReadStats) -> Iterator[str]:
    for lineno, line in lines:
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
        if text is not None and not isinstance(text, str):
            raise DatasetError(f"{path}:{lineno}: \"{text_key}\" is {type(text).__name__}, expected a string")
        if text:
            stats.documents += 1
            yield text
        else:
            stats.empty_skipped += 1


def iter_file_documents(path: str, text_key: str = "text", split: str = "train",
                        stats: Optional[ReadStats] = None) -> Iterator[str]:
    """Yield the documents of one source, in order. Empty documents are skipped (and counted)."""
    stats = stats if stats is not None else ReadStats()
    if os.path.isdir(path):
        yield from _iter_saved_dataset(path, text_key, split, stats)
        return
    if path.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path, text_key, stats)
        return
    zstd_error: tuple = ()
    if path.endswith(".zst"):
        zstd_error = (optional_import("zstandard", f"reading {path}").ZstdError,)
    try:
        with _open_binary(path) as f:
            lines = _decoded_lines(path, f)
            if path.endswith(TEXT_SUFFIXES):
                yield from _iter_txt(lines, stats)
            else:
                yield from _iter_jsonl(path, lines, text_key, stats)
    except (OSError, EOFError, gzip.BadGzipFile) + zstd_error as e:
        raise DatasetError(f"{path}: cannot be read ({e}). It is truncated or corrupt: download or write it "
                           f"again") from None


def iter_documents(files: Iterable[str], text_key: str = "text", split: str = "train",
                   stats: Optional[ReadStats] = None) -> Iterator[str]:
    """All documents of all sources, in the given order."""
    for path in check_input_files(files, split):
        yield from iter_file_documents(path, text_key, split, stats)


def files_without_text(files: Iterable[str], text_key: str = "text", split: str = "train") -> list[str]:
    """The sources that hold no document (empty, or only blank lines): named when a corpus turns out
    to have no text at all."""
    return [f for f in files if next(iter_file_documents(f, text_key, split), None) is None]


def no_text_error(files: list[str], text_key: str = "text", split: str = "train") -> DatasetError:
    empty = files_without_text(files, text_key, split)
    if not empty:
        return DatasetError(f"the input files hold no text: {', '.join(files)}")
    return DatasetError(f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (no text). Put documents "
                        f"in {'it' if len(empty) == 1 else 'them'} or leave {'it' if len(empty) == 1 else 'them'} "
                        f"out of the corpus")
