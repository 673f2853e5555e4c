"""Every corpus and dataset format end to end through `megaloop train` (the command, a tiny model,
a few steps) on a small generated corpus: the run finishes with a finite validation loss, every
document of the source reached the datasets (counted independently), and the token ledger sums to
the run's tokens."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")

from conftest import tiny_raw, write_corpus  # noqa: E402
from megaloop.cli import main  # noqa: E402
from megaloop.data.documents import iter_documents  # noqa: E402
from megaloop.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow
VOCAB = 384


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The generated documents, the sentencepiece model shared by most runs, and a folder."""
    d = tmp_path_factory.mktemp("fmt")
    src = write_corpus(str(d / "gen"), n_docs=60, seed=4)
    docs = list(iter_documents([src]))
    model = train_tokenizer([src], str(d / "tok"), VOCAB, "unigram")
    return docs, model, d


def _train(tmp_path, data: dict, vocab: int = VOCAB) -> dict:
    """`megaloop train CONFIG` in this process; returns summary.json and the data cache's DONE."""
    run = str(tmp_path / "run")
    raw = tiny_raw("unused", str(tmp_path / "cache"), run, steps=4)
    raw["model"]["vocab_size"] = vocab
    raw["data"] = dict(raw["data"], **data)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg)]) == 0
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert np.isfinite(summary["val_loss"])
    assert sum(summary["tokens_by_dataset"].values()) == summary["tokens"] == 4 * 4 * 32
    done = None
    cache = tmp_path / "cache"
    for key in os.listdir(cache) if cache.is_dir() else []:
        if os.path.isfile(cache / key / "DONE"):
            done = json.load(open(cache / key / "DONE"))
    return {"summary": summary, "done": done}


def _n_docs(out: dict) -> int:
    return out["done"]["stats"]["train_docs"] + out["done"]["stats"]["valid_docs"]


def test_parquet_shards_one_config_line(corpus, tmp_path) -> None:
    """A FineWeb-Edu-style folder of parquet shards (text column among others, several row
    groups) trains with data.corpus = [folder] alone: tokenizer trained from it, every row read."""
    docs, _, _ = corpus
    shards = tmp_path / "fineweb" / "sample" / "10BT"
    shards.mkdir(parents=True)
    for i, part in enumerate((docs[:35], docs[35:])):
        pq.write_table(pa.table({"text": part, "id": [f"<urn:{i}:{j}>" for j in range(len(part))],
                                 "score": [3.1] * len(part)}), shards / f"00{i}_00000.parquet", row_group_size=8)
    out = _train(tmp_path, {"corpus": [str(shards)]})
    assert _n_docs(out) == len(docs)


@pytest.mark.parametrize("kind", ["jsonl_zst", "txt_zst", "saved_dict", "hub_split", "mixed"])
def test_streamed_and_datasets_sources(corpus, tmp_path, kind) -> None:
    """.jsonl.zst, .txt.zst, a save_to_disk DatasetDict (data.split), a hub-layout folder
    (data.split picks its files) and a mixed list each train; all their documents are used."""
    docs, model, _ = corpus
    data = {"tokenizer": model}
    if kind == "jsonl_zst":
        p = tmp_path / "c.jsonl.zst"
        p.write_bytes(zstd.ZstdCompressor().compress("".join(json.dumps({"content": d}) + "\n" for d in docs).encode()))
        data.update(corpus=[str(p)], text_key="content")
        n = len(docs)
    elif kind == "txt_zst":
        p = tmp_path / "c.txt.zst"
        p.write_bytes(zstd.ZstdCompressor().compress("\n\f\n".join(docs).encode()))
        data.update(corpus=[str(p)])
        n = len(docs)
    elif kind == "saved_dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:10]}),
                              "web": datasets.Dataset.from_dict({"text": docs[10:]})}).save_to_disk(str(tmp_path / "dd"))
        data.update(corpus=[str(tmp_path / "dd")], split="web")
        n = len(docs) - 10
    elif kind == "hub_split":
        (tmp_path / "hub" / "data").mkdir(parents=True)
        pq.write_table(pa.table({"text": docs[:48]}), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
        pq.write_table(pa.table({"text": docs[48:]}), tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet")
        data.update(corpus=[str(tmp_path / "hub")], split="train")
        n = 48
    else:
        p = tmp_path / "a.jsonl.zst"
        p.write_bytes(zstd.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]).encode()))
        pq.write_table(pa.table({"text": docs[20:40]}), tmp_path / "b.parquet")
        datasets.Dataset.from_dict({"text": docs[40:]}).save_to_disk(str(tmp_path / "saved"))
        data.update(corpus=[str(p), str(tmp_path / "b.parquet"), str(tmp_path / "saved")])
        n = len(docs)
    out = _train(tmp_path, data)
    assert _n_docs(out) == n


def test_hf_tokenizer_json(corpus, tmp_path) -> None:
    """data.tokenizer = a Hugging Face tokenizer.json (byte-level BPE trained here): the corpus is
    tokenized with it and the run trains at its vocabulary."""
    from test_data_hf_tokenizer import train_bpe
    docs, _, _ = corpus
    path = train_bpe(str(tmp_path / "tokenizer.json"), docs, vocab=300)
    vocab = Tokenizer(path).vocab_size
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = _train(tmp_path, {"corpus": [str(p)], "tokenizer": path}, vocab=vocab)
    assert _n_docs(out) == len(docs)


def test_megatron_datasets(corpus, tmp_path) -> None:
    """data.train / data.valid as Megatron pairs: one written by `megaloop preprocess --format
    megatron`, one by megatron-core's own IndexedDatasetBuilder (no sidecar), blended 3:1."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    import torch
    docs, model, _ = corpus
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["preprocess", "--input", str(p), "--tokenizer", model, "--out-dir", str(tmp_path / "mg"),
                 "--format", "megatron", "--workers", "2", "--valid-fraction", "0.2", "--no-progress"]) == 0
    tok = Tokenizer(model)
    prefix = str(tmp_path / "theirs")
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs[:30]:
        b.add_item(torch.tensor(tok.encode(d) + [tok.eos_id]))
        b.end_document()
    b.finalize(prefix + ".idx")
    out = _train(tmp_path, {"tokenizer": model, "valid": str(tmp_path / "mg" / "valid"),
                            "train": [{"path": str(tmp_path / "mg" / "train"), "weight": 3},
                                      {"path": prefix, "weight": 1}]})
    ledger = out["summary"]["tokens_by_dataset"]
    assert list(ledger.values()) == [12 * 32, 4 * 32]  # 16 samples split 3:1
