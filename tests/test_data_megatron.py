"""Megatron .bin/.idx interoperability, against the real megatron-core: pairs its
IndexedDatasetBuilder writes read in megaloop token for token (every integer dtype), pairs megaloop
writes read in its IndexedDataset document for document, they blend with megaloop's own files,
and mismatches with the configured tokenizer are refused."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from megaloop.data.errors import DatasetError
from megaloop.data.indexed import IndexedDataset, IndexedDatasetWriter, check_vocab
from megaloop.data.token_files import open_dataset
from megaloop.data.loader import PackedLoader, eval_batches
from megaloop.data.megatron import MegatronDataset, MegatronWriter
from megaloop.data.preprocess import preprocess, unigram_entropy
from megaloop.data.tokenizer import train_tokenizer
from test_data_formats import bundled_docs


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _docs(hi: int, n: int = 30, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, hi, size=int(rng.integers(1, 60))) for _ in range(n)]


@pytest.mark.parametrize("dtype,hi", [(np.uint16, 65535), (np.int32, 200_000), (np.int64, 2**40), (np.uint8, 255),
                                      (np.int16, 30_000), (np.int8, 127)])
def test_megatron_core_files_read_token_for_token(mcore, tmp_path, dtype, hi) -> None:
    """IndexedDatasetBuilder's files (add_item + end_document, and add_document with several
    sequences per document) read in megaloop: the stream is every item back to back, documents
    are the builder's documents."""
    prefix = str(tmp_path / "m")
    docs = _docs(hi)
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs[:20]:
        b.add_item(torch.from_numpy(d.astype(np.int64)))
        b.end_document()
    for d in docs[20:]:  # a document of two sequences
        cut = len(d) // 2
        b.add_document(d.astype(np.int64), [cut, len(d) - cut])
    b.finalize(prefix + ".idx")
    ds = open_dataset(prefix)
    assert isinstance(ds, MegatronDataset) and ds.dtype == np.dtype(dtype)
    assert ds.vocab_size is None and ds.tokenizer_fingerprint == 0
    assert ds.n_docs == len(docs) and ds.n_tokens == sum(map(len, docs))
    assert np.asarray(ds.tokens).tolist() == np.concatenate(docs).tolist()
    for i, d in enumerate(docs):
        assert np.asarray(ds[i]).tolist() == d.tolist()
    assert ds.offsets.tolist() == np.concatenate([[0], np.cumsum(list(map(len, docs)))]).tolist()
    assert ds.scan_max_token() == int(np.concatenate(docs).max())


def test_megaloop_files_read_in_megatron_core(mcore, tmp_path) -> None:
    """MegatronWriter's pair reads in megatron-core's IndexedDataset: one sequence per document,
    the document with its eos; the dtype is the one megatron's preprocess picks."""
    for vocab, dtype in ((500, np.uint16), (70_000, np.int32)):
        prefix = str(tmp_path / f"w{vocab}")
        docs = _docs(vocab - 1, seed=vocab)
        with MegatronWriter(prefix, vocab, eos_id=vocab - 1, tokenizer_fingerprint=77) as w:
            for d in docs[:10]:
                w.add_document(d)
            flat = np.concatenate([np.append(d, vocab - 1) for d in docs[10:]])
            w.add_documents(flat, np.array([len(d) + 1 for d in docs[10:]]))
        theirs = mcore.IndexedDataset(prefix)
        assert len(theirs) == len(docs) and theirs.index.dtype == dtype
        assert theirs.document_indices.tolist() == list(range(len(docs) + 1))
        for i, d in enumerate(docs):
            assert theirs[i].tolist() == d.tolist() + [vocab - 1]
        ours = MegatronDataset(prefix, full_check=True)
        assert (ours.vocab_size, ours.eos_id, ours.tokenizer_fingerprint) == (vocab, vocab - 1, 77)


def test_preprocess_format_megatron_and_blending(mcore, tmp_path) -> None:
    """`preprocess(fmt="megatron")` stores the same tokens as the default format; the Megatron pair
    blends with a megaloop pair in PackedLoader (weights honoured) and feeds eval_batches."""
    docs = bundled_docs(60)
    src = tmp_path / "c.txt"
    src.write_text("\n\f\n".join(docs))
    model = train_tokenizer([str(src)], str(tmp_path / "tok"), 400, "bpe")
    preprocess([str(src)], model, str(tmp_path / "ml"), valid_fraction=0.2, workers=1)
    preprocess([str(src)], model, str(tmp_path / "mg"), valid_fraction=0.2, workers=2, fmt="megatron")
    for side in ("train", "valid"):
        a, b = IndexedDataset(str(tmp_path / "ml" / side)), open_dataset(str(tmp_path / "mg" / side))
        assert isinstance(b, MegatronDataset)
        assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)) and a.n_docs == b.n_docs
        assert len(mcore.IndexedDataset(str(tmp_path / "mg" / side))) == a.n_docs
    assert unigram_entropy(str(tmp_path / "ml" / "valid")) == unigram_entropy(str(tmp_path / "mg" / "valid"))
    loader = PackedLoader([str(tmp_path / "ml" / "train"), str(tmp_path / "mg" / "train")], [3, 1], seq_len=16,
                          micro_batch_size=4, seed=0)
    for _ in range(10):
        loader.next_batch()
    assert loader.counts.tolist() == [30, 10]
    x, y = next(eval_batches(str(tmp_path / "mg" / "valid"), 16, 2))
    assert x.shape == (2, 16) and torch.equal(x[0, 1:], y[0, :-1])


def test_tokenizer_mismatch_and_small_dtype_refused(mcore, tmp_path) -> None:
    """A Megatron pair whose dtype cannot hold the vocabulary, one holding ids past it, and one
    written (with its sidecar) by another tokenizer each fail check_vocab naming the fix."""
    p8 = str(tmp_path / "u8")
    b = mcore.IndexedDatasetBuilder(p8 + ".bin", dtype=np.uint8)
    b.add_item(torch.tensor([1, 2, 3]))
    b.end_document()
    b.finalize(p8 + ".idx")
    with pytest.raises(DatasetError, match=r"u8\.idx stores uint8 ids \(up to 255\) but the tokenizer has 500 tokens"):
        check_vocab(open_dataset(p8), 500)
    check_vocab(open_dataset(p8), 200)  # fits
    with pytest.raises(DatasetError, match=r"holds token id 3, outside model.vocab_size=3"):
        check_vocab(open_dataset(p8), 3)
    pw = str(tmp_path / "w")
    with MegatronWriter(pw, 500, 1, tokenizer_fingerprint=11) as w:
        w.add_document([5, 6, 7])
    with pytest.raises(DatasetError, match="different tokenizer"):
        check_vocab(open_dataset(pw), 500, tokenizer_fingerprint=12)
    with pytest.raises(DatasetError, match="500-token vocabulary"):
        check_vocab(open_dataset(pw), 600)
    # A float file is not a token dataset; a .bin cut short is named
    pf = str(tmp_path / "f")
    b = mcore.IndexedDatasetBuilder(pf + ".bin", dtype=np.float32)
    b.add_item(torch.tensor([1.0]))
    b.end_document()
    b.finalize(pf + ".idx")
    with pytest.raises(DatasetError, match="float32 values, not token ids"):
        open_dataset(pf)
    with open(pw + ".bin", "r+b") as f:
        f.truncate(2)
    with pytest.raises(DatasetError, match=r"w\.bin: size 2 bytes, expected 8"):
        open_dataset(pw)


def test_megatron_writer_crash_publishes_nothing(tmp_path) -> None:
    """An exception while writing leaves neither .bin, .idx nor the sidecar."""
    with pytest.raises(RuntimeError):
        with MegatronWriter(str(tmp_path / "x"), 100, 1) as w:
            w.add_document([3, 4])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with IndexedDatasetWriter(str(tmp_path / "y"), 100, 1) as w:
        w.add_document([3])
    assert isinstance(open_dataset(str(tmp_path / "y")), IndexedDataset)
