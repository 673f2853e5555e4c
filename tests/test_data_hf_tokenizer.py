"""Hugging Face tokenizer.json through megaloop's Tokenizer: a byte-level BPE trained here with the
`tokenizers` library round-trips losslessly, ids equal the library's own encoding, no bos is
added, the eos is the named end-of-text token appended once per document by preprocess."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from megaloop.data.errors import TokenizerError  # noqa: E402
from megaloop.data.indexed import IndexedDataset  # noqa: E402
from megaloop.data.preprocess import preprocess  # noqa: E402
from megaloop.data.tokenizer import HFTokenizer, Tokenizer  # noqa: E402
from test_data_formats import bundled_docs  # noqa: E402

TRICKY = ["", " ", "  two  spaces  ", "\n\n\ttab\r\n", "caf\u00e9 na\u00efve \u00fcber", "\u2581meta\u2581",
          "\U0001f600 emoji", "\u4e2d\u6587\u5b57", "<|endoftext|> in text", "\x00\x01 control", "ends with space "]


def train_bpe(path: str, docs: list[str], vocab: int = 500, eos: str = "<|endoftext|>",
              template_bos: bool = False) -> str:
    """A byte-level BPE tokenizer.json, trained on `docs` by the tokenizers library itself."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, processors, trainers
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    if template_bos:  # a post-processor that adds <s> ... eos, as many published tokenizers do
        tok.post_processor = processors.TemplateProcessing(
            single=f"<s> $A {eos}", special_tokens=[("<s>", tok.token_to_id("<s>")), (eos, tok.token_to_id(eos))])
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def docs():
    return bundled_docs(80)


@pytest.fixture(scope="module")
def hf_path(docs, tmp_path_factory):
    return train_bpe(str(tmp_path_factory.mktemp("hf") / "tokenizer.json"), docs, template_bos=True)


def test_lossless_round_trip_and_same_ids_as_the_library(hf_path, docs) -> None:
    """decode(encode(x)) == x for corpus documents and tricky strings; ids equal the library's own
    encode without special tokens (so a corpus is tokenized exactly as the tokenizer's model was)."""
    tok = Tokenizer(hf_path)
    assert isinstance(tok, HFTokenizer)
    ref = tokenizers.Tokenizer.from_file(hf_path)
    for text in docs + TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode_batch(docs[:10]) == [tok.encode(d) for d in docs[:10]]


def test_no_bos_and_the_eos_is_the_end_of_text_token(hf_path) -> None:
    """The template's <s> ... eos is not applied: encode adds neither; eos_id is <|endoftext|>."""
    tok = Tokenizer(hf_path)
    ref = tokenizers.Tokenizer.from_file(hf_path)
    bos = ref.token_to_id("<s>")
    assert tok.eos_id == ref.token_to_id("<|endoftext|>")
    assert ref.encode("hello").ids[0] == bos  # the library's default would add it
    ids = tok.encode("hello")
    assert bos not in ids and tok.eos_id not in ids
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)


def test_eos_from_tokenizer_config_and_folder(docs, tmp_path) -> None:
    """A model folder (tokenizer.json + tokenizer_config.json naming eos_token) works as a path; a
    tokenizer with no end-of-text token is refused with the fix."""
    folder = tmp_path / "model"
    folder.mkdir()
    train_bpe(str(folder / "tokenizer.json"), docs, eos="<my_end>")
    with pytest.raises(TokenizerError, match="no end-of-text token.*add_special_tokens"):
        Tokenizer(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_end>"}}))
    tok = Tokenizer(str(folder))
    assert tok.eos_id == tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<my_end>")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="broken.json is not a valid Hugging Face tokenizer.json"):
        Tokenizer(str(tmp_path / "broken.json"))


def test_preprocess_with_hf_tokenizer(hf_path, docs, tmp_path) -> None:
    """Each stored document is the library's encoding + [eos], once; 1 and 2 workers give the same
    bytes; the fingerprint recorded is this tokenizer.json's."""
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ref = tokenizers.Tokenizer.from_file(hf_path)
    tok = Tokenizer(hf_path)
    for w in (1, 2):
        preprocess([str(src)], hf_path, str(tmp_path / f"w{w}"), valid_fraction=0.2, workers=w)
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    got = []
    for side in ("train", "valid"):
        ds = IndexedDataset(str(tmp_path / "w1" / side), full_check=True)
        assert ds.tokenizer_fingerprint == tok.fingerprint and ds.vocab_size == tok.vocab_size
        got += [tuple(np.asarray(ds[i]).tolist()) for i in range(len(ds))]
    expected = [tuple(ref.encode(d, add_special_tokens=False).ids + [tok.eos_id]) for d in docs]
    assert sorted(got) == sorted(expected)
    assert os.path.getsize(tmp_path / "w1" / "train.bin") > 0
