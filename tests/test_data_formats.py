"""Corpus sources: every format yields exactly the documents written into it (an independent list
built from the bundled corpus at test time), mixed lists read in order, and every kind of bad
input is one DatasetError naming the file (and row group / line) with no output left behind."""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")

from megaloop.data.documents import ReadStats, _iter_txt, _decoded_lines, iter_documents, split_txt  # noqa: E402
from megaloop.data.errors import DatasetError  # noqa: E402
from megaloop.data.preprocess import preprocess  # noqa: E402
from megaloop.data.tokenizer import train_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bundled_docs(n: int = 120, name: str = "shakespeare_sonnets.txt.gz") -> list[str]:
    """Small documents cut from a bundled corpus file (paragraphs, three at a time)."""
    with gzip.open(os.path.join(REPO, "data", "corpus", name), "rt", encoding="utf-8") as f:
        text = f.read().replace("\f", "")
    paras = [p for p in text.split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i:i + 3]) for i in range(0, 3 * n, 3)]
    return [d for d in docs if d][:n]


def write_parquet(path, docs, row_group_size=16, extra=True) -> None:
    cols = {"id": list(range(len(docs))), "text": docs}
    if extra:
        cols["score"] = [float(i) / 7 for i in range(len(docs))]
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


def write_zst(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(zstd.ZstdCompressor(write_checksum=True).compress(data))


def jsonl_bytes(docs) -> bytes:
    return "".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)).encode()


@pytest.fixture(scope="module")
def docs():
    return bundled_docs()


@pytest.fixture(scope="module")
def sources(docs, tmp_path_factory):
    """Each source format holding a known slice of `docs` (mixed with empty documents where the
    format can hold them)."""
    d = tmp_path_factory.mktemp("sources")
    out = {}
    shards = d / "shards"
    shards.mkdir()
    write_parquet(shards / "000_00000.parquet", docs[:50])
    write_parquet(shards / "000_00001.parquet", docs[50:80])
    out["parquet_folder"] = (str(shards), docs[:80])
    out["parquet_file"] = (str(shards / "000_00001.parquet"), docs[50:80])
    write_zst(d / "a.jsonl.zst", jsonl_bytes(docs[:30]))
    out["jsonl_zst"] = (str(d / "a.jsonl.zst"), docs[:30])
    write_zst(d / "b.txt.zst", "\n\f\n".join(docs[30:60]).encode())
    out["txt_zst"] = (str(d / "b.txt.zst"), docs[30:60])
    ds = datasets.Dataset.from_dict({"text": docs[:40], "n": list(range(40))})
    ds.save_to_disk(str(d / "saved"))
    out["saved"] = (str(d / "saved"), docs[:40])
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:25]}),
                               "validation": datasets.Dataset.from_dict({"text": docs[25:35]})})
    dd.save_to_disk(str(d / "saved_dict"))
    out["saved_dict"] = (str(d / "saved_dict"), docs[:25])
    hub = d / "hub" / "data"
    hub.mkdir(parents=True)
    write_parquet(hub / "train-00000-of-00002.parquet", docs[:20])
    write_parquet(hub / "train-00001-of-00002.parquet", docs[20:45])
    write_parquet(hub / "test-00000-of-00001.parquet", docs[45:55])
    out["hub"] = (str(d / "hub"), docs[:45])
    return out


@pytest.mark.parametrize("kind", ["parquet_folder", "parquet_file", "jsonl_zst", "txt_zst", "saved", "saved_dict",
                                  "hub"])
def test_each_source_reads_its_documents(sources, kind) -> None:
    """A source yields exactly the documents written into it, in order."""
    path, expected = sources[kind]
    assert list(iter_documents([path])) == expected


def test_split_option_and_mixed_list(sources, docs) -> None:
    """split picks a DatasetDict split and the hub layout's split files; a mixed list of formats
    reads source after source."""
    assert list(iter_documents([sources["saved_dict"][0]], split="validation")) == docs[25:35]
    assert list(iter_documents([sources["hub"][0]], split="test")) == docs[45:55]
    mixed = [sources[k][0] for k in ("jsonl_zst", "parquet_file", "saved", "txt_zst")]
    expected = [d for k in ("jsonl_zst", "parquet_file", "saved", "txt_zst") for d in sources[k][1]]
    assert list(iter_documents(mixed)) == expected


def test_parquet_reading_is_bounded_by_batches(tmp_path, docs, monkeypatch) -> None:
    """A shard is read a batch of rows at a time (never a whole row group): with one 120-row row
    group and 8-row batches, no batch handed to the reader is larger than 8 rows."""
    import megaloop.data.documents as documents
    write_parquet(tmp_path / "one.parquet", docs, row_group_size=len(docs))
    monkeypatch.setattr(documents, "PARQUET_BATCH_ROWS", 8)
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **kw):
        for b in real(self, *a, **kw):
            seen.append(b.num_rows)
            yield b
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert list(iter_documents([str(tmp_path / "one.parquet")])) == docs
    assert max(seen) == 8 and sum(seen) == len(docs)


def test_txt_stream_equals_whole_file_split() -> None:
    """The streaming .txt reader gives split_txt's documents for random texts full of form feeds,
    newlines and carriage returns."""
    import io
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b c", "\n", "\f", "\n\f\n", "\r\n", "é"]) for _ in range(rng.randint(0, 30)))
        lines = _decoded_lines("x.txt", io.BytesIO(text.encode()))
        universal = text.replace("\r\n", "\n").replace("\r", "\n")
        assert list(_iter_txt(lines, ReadStats())) == split_txt(universal), repr(text)


def test_empty_documents_are_skipped_and_counted(tmp_path, docs) -> None:
    """Empty strings and nulls are skipped, not fatal, and counted in ReadStats and PreprocessStats."""
    pq.write_table(pa.table({"text": [docs[0], "", None, docs[1], docs[2], ""]}), tmp_path / "e.parquet")
    write_zst(tmp_path / "e.jsonl.zst", b'{"text": ""}\n{"text": "x y"}\n{"text": null}\n')
    stats = ReadStats()
    got = list(iter_documents([str(tmp_path / "e.parquet"), str(tmp_path / "e.jsonl.zst")], stats=stats))
    assert got == [docs[0], docs[1], docs[2], "x y"]
    assert (stats.documents, stats.empty_skipped) == (4, 5)
    model = train_tokenizer([str(tmp_path / "e.parquet")], str(tmp_path / "tok"), 340, "bpe")
    st = preprocess([str(tmp_path / "e.parquet"), str(tmp_path / "e.jsonl.zst")], model, str(tmp_path / "o"),
                    valid_fraction=0.3, workers=1)
    assert st.empty_skipped == 5 and st.train_docs + st.valid_docs == 4


# ------------------------------------------------------------------ bad input

def _bad_cases(d, docs):
    """(name, input paths, split, regex the message must match)."""
    write_parquet(d / "notext.parquet", docs[:5])
    pq.write_table(pa.table({"body": docs[:5], "url": ["u"] * 5}), d / "nocol.parquet")
    mixed = d / "mixed"
    mixed.mkdir()
    write_parquet(mixed / "a.parquet", docs[:5])
    write_parquet(mixed / "b.parquet", docs[5:10], extra=False)
    whole = (d / "notext.parquet").read_bytes()
    (d / "trunc.parquet").write_bytes(whole[: len(whole) // 2])
    # a page of the middle row group overwritten (footer intact): found while reading
    write_parquet(d / "pages.parquet", docs[:64], row_group_size=16)
    meta = pq.ParquetFile(d / "pages.parquet").metadata
    col = meta.row_group(2).column(1)
    blob = bytearray((d / "pages.parquet").read_bytes())
    start = col.data_page_offset
    blob[start:start + 40] = b"\xff" * 40
    (d / "pages_bad.parquet").write_bytes(bytes(blob))
    data = jsonl_bytes(docs[:40])
    comp = zstd.ZstdCompressor(write_checksum=True).compress(data)
    (d / "trunc.jsonl.zst").write_bytes(comp[: len(comp) - 30])
    (d / "garbage.jsonl.zst").write_bytes(b"not zstd at all" * 20)
    write_zst(d / "latin1.jsonl.zst", b'{"text": "fine"}\n{"text": "ok"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    arr = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0])),
                                                 pa.py_buffer(b"okba\xff\xfe")])
    pq.write_table(pa.table({"text": arr}), d / "badutf8.parquet")
    pq.write_table(pa.table({"text": pa.array([b"good", b"caf\xe9"], type=pa.binary())}), d / "binary.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:3]})}).save_to_disk(str(d / "dd"))
    return [
        ("missing column", [d / "nocol.parquet"], "train", r"nocol\.parquet: no column 'text' \(its columns: body, url\)"),
        ("schemas differ", [mixed], "train", r"b\.parquet: its schema differs from .*a\.parquet.*score"),
        ("truncated parquet", [d / "trunc.parquet"], "train", r"trunc\.parquet: not a readable parquet file.*truncated"),
        ("corrupt page", [d / "pages_bad.parquet"], "train", r"pages_bad\.parquet: row group 2 cannot be read"),
        ("truncated zst", [d / "trunc.jsonl.zst"], "train", r"trunc\.jsonl\.zst: cannot be read.*ends inside"),
        ("not zst", [d / "garbage.jsonl.zst"], "train", r"garbage\.jsonl\.zst: cannot be read"),
        ("latin-1 line", [d / "latin1.jsonl.zst"], "train", r"latin1\.jsonl\.zst:3: not valid UTF-8"),
        ("bad utf-8 parquet", [d / "badutf8.parquet"], "train", r"badutf8\.parquet: row group 0 .*not valid UTF-8"),
        ("bad utf-8 binary", [d / "binary.parquet"], "train", r"binary\.parquet: row 1 \(row group 0\) is not valid UTF-8"),
        ("no such split", [d / "dd"], "validation", r"dd: no split 'validation' .*it has train.*data\.split"),
        ("no such hub split", [mixed.parent / "hubx"], "test", r"hubx: no split 'test' .*train"),
    ]


@pytest.fixture(scope="module")
def bad(docs, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "hubx").mkdir()
    write_parquet(d / "hubx" / "train-00000-of-00001.parquet", docs[:5])
    write_parquet(d / "good.parquet", docs[:60])
    model = train_tokenizer([str(d / "good.parquet")], str(d / "tok"), 400, "bpe")
    return {name: (paths, split, msg) for name, paths, split, msg in _bad_cases(d, docs)}, model


@pytest.mark.parametrize("case", ["missing column", "schemas differ", "truncated parquet", "corrupt page",
                                  "truncated zst", "not zst", "latin-1 line", "bad utf-8 parquet",
                                  "bad utf-8 binary", "no such split", "no such hub split"])
def test_bad_input_is_one_clear_error_and_writes_nothing(bad, case, tmp_path) -> None:
    """Each bad input: DatasetError naming the file (and row group / line) and the fix; preprocess
    leaves its output folder without a dataset file."""
    cases, model = bad
    paths, split, msg = cases[case]
    with pytest.raises(DatasetError, match=msg):
        list(iter_documents([str(p) for p in paths], split=split))
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=msg):
        preprocess([str(p) for p in paths], model, str(out), valid_fraction=0.2, workers=1, split=split)
    assert not out.exists()


def test_cli_bad_input_exits_2(bad, tmp_path) -> None:
    """Through the real `megaloop preprocess` command: exit status 2, the message on one line, no
    traceback, nothing written."""
    cases, model = bad
    paths, _, _ = cases["missing column"]
    out = tmp_path / "o"
    res = subprocess.run([sys.executable, "-m", "megaloop.cli", "preprocess", "--input", str(paths[0]), "--tokenizer",
                          model, "--out-dir", str(out), "--workers", "1"], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "no column 'text' (its columns: body, url)" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_missing_extra_is_named(monkeypatch, tmp_path) -> None:
    """Without the optional package, the error names the data extra."""
    import builtins
    real = builtins.__import__

    def no_zstd(name, *a, **kw):
        if name == "zstandard":
            raise ImportError(name)
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_zstd)
    import importlib
    monkeypatch.setattr(importlib, "import_module", lambda n: no_zstd(n))
    write_zst(tmp_path / "x.jsonl.zst", b'{"text": "a"}\n')
    with pytest.raises(DatasetError, match=r"zstandard.*data extra"):
        list(iter_documents([str(tmp_path / "x.jsonl.zst")]))


def test_preprocess_progress_and_bounded_in_flight(tmp_path, docs, monkeypatch, capsys) -> None:
    """The progress bar shows documents, tokens and tokens/s; the reader is never more than
    IN_FLIGHT x workers chunks ahead of the writer (memory bounded whatever the corpus size), and the
    output equals the 1-worker output."""
    import megaloop.data.preprocess as pp
    monkeypatch.setattr(pp, "CHUNK_CHARS", 2000)  # many small chunks
    src = tmp_path / "c.jsonl.zst"
    write_zst(src, jsonl_bytes(docs * 3))
    model = train_tokenizer([str(src)], str(tmp_path / "tok"), 400, "bpe")
    read, written = [0], [0]
    real_chunks, real_encoded = pp._chunks, pp._encoded

    def counted_chunks(it):
        for c in real_chunks(it):
            read[0] += 1
            yield c

    def counted_encoded(*a, **kw):
        for e in real_encoded(*a, **kw):
            assert read[0] - written[0] <= pp.IN_FLIGHT * 2 + 1, (read[0], written[0])
            written[0] += 1
            yield e
    monkeypatch.setattr(pp, "_chunks", counted_chunks)
    monkeypatch.setattr(pp, "_encoded", counted_encoded)
    st = pp.preprocess([str(src)], model, str(tmp_path / "o2"), valid_fraction=0.1, workers=2, progress=True)
    err = capsys.readouterr().err
    assert "preprocess" in err and f"{st.train_docs + st.valid_docs}" in err and "tokens/s" in err
    assert written[0] == read[0] > 20
    pp.preprocess([str(src)], model, str(tmp_path / "o1"), valid_fraction=0.1, workers=1)
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
