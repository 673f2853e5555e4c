"""A lossless sentencepiece tokenizer: training from raw corpora and a small wrapper.

Lossless means decode(encode(x)) == x for every string x. sentencepiece only gives that with
  * normalization_rule_name="identity" (no NFKC: it would rewrite e.g. full-width characters),
  * remove_extra_whitespaces=False (else runs of spaces collapse),
  * add_dummy_prefix=False (else a space is invented before the text),
  * byte_fallback=True (characters outside the vocabulary become UTF-8 byte pieces, never <unk>).
Training sees text line by line, so "\\n" never occurs in it: it is added as a user-defined piece
so a newline costs one token. The end-of-document id is sentencepiece's eos id (there is no bos).
One more gap: sentencepiece reads a literal U+2581 ("▁", its whitespace meta symbol) in the input
as a space. `Tokenizer.encode` therefore emits that character as its three UTF-8 byte pieces,
which decode back to it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from .documents import iter_documents, no_text_error
from .errors import DatasetError, TokenizerError

MODEL_TYPES = ("unigram", "bpe")
# sentencepiece's unigram trainer gives different pieces for different thread counts, so the
# count is fixed (not taken from the machine) to keep training deterministic given the inputs.
TRAIN_THREADS = 4
SEED = 1234
META = "\u2581"


def _training_sentences(files: Sequence[str], text_key: str, max_sentence_length: int,
                        split: str = "train") -> Iterator[str]:
    """Non-empty lines of every document; lines longer than the limit are cut into pieces.

    sentencepiece silently skips sentences over max_sentence_length bytes; cutting keeps their text
    in the statistics. A slice of max_sentence_length // 4 characters is at most that many bytes.
    """
    step = max(1, max_sentence_length // 4)
    for doc in iter_documents(files, text_key, split):
        for line in doc.split("\n"):
            if not line:
                continue
            if len(line.encode("utf-8")) <= max_sentence_length:
                yield line
            else:
                for i in range(0, len(line), step):
                    yield line[i:i + step]


def train_tokenizer(files: Iterable[str], out_prefix: str, vocab_size: int, model_type: str = "unigram",
                    text_key: str = "text", max_sentence_length: int = 16384,
                    max_sentences: int = 10_000_000, character_coverage: float = 0.9995,
                    split: str = "train") -> str:
    """Train a lossless sentencepiece model on the documents of `files`; return `out_prefix.model`.

    Deterministic given the files (content and order) and the arguments. At most `max_sentences`
    lines are used (a seeded sample beyond that). The model is written atomically.
    """
    files = list(files)
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"unknown tokenizer type {model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:
        raise TokenizerError(f"vocab size {vocab_size} is too small: the 256 byte-fallback pieces, the special "
                             f"ids and the corpus characters need at least ~300 (use e.g. 512 or more)")
    model = io.BytesIO()
    spm.set_random_generator_seed(SEED)
    # An error raised inside the iterator would come back wrapped in sentencepiece's INTERNAL
    # message; catch it here and raise it as it is once training returns.
    caught: list = []
    seen = [0]

    def sentences() -> Iterator[str]:
        try:
            for s in _training_sentences(files, text_key, max_sentence_length, split):
                seen[0] += 1
                yield s
        except DatasetError as e:
            caught.append(e)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            split_by_whitespace=True, user_defined_symbols=["\n"],
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            character_coverage=character_coverage, max_sentence_length=max_sentence_length,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=TRAIN_THREADS, minloglevel=2,
        )
    except RuntimeError as e:
        if caught:
            raise caught[0] from None
        if not seen[0]:
            raise no_text_error(files, text_key, split) from None
        msg = str(e)
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if m:
            raise TokenizerError(f"vocab size {vocab_size} is too small for this corpus: it needs at least "
                                 f"{int(m.group(2)) + 16} (byte pieces + distinct characters)") from None
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if m:
            raise TokenizerError(f"vocab size {vocab_size} is too large for this small corpus: use at most "
                                 f"{m.group(2)} or add more text") from None
        raise TokenizerError(f"sentencepiece training failed on {len(files)} file(s): {msg}") from None
    if caught:  # the iterator stopped early: the model saw part of the corpus only
        raise caught[0]
    path = f"{out_prefix}.model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return path


def is_hf_tokenizer(path: str) -> bool:
    """A Hugging Face `tokenizer.json` (or a model folder holding one) rather than a sentencepiece model."""
    path = os.fspath(path)
    return path.endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json"))


def fingerprint(blob: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


class Tokenizer:
    """A loaded tokenizer. `eos_id` marks the end of each document in datasets.

    `Tokenizer(path)` opens a sentencepiece `.model`, or a Hugging Face `tokenizer.json` (or a
    folder holding one): that gives an `HFTokenizer`, with the same methods.
    """

    def __new__(cls, path: str):
        if cls is Tokenizer and is_hf_tokenizer(path):
            return super().__new__(HFTokenizer)
        return super().__new__(cls)

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"tokenizer model not found: {self.path}. Train one with `megaloop tokenizer "
                                 f"--input FILES --out PREFIX --vocab-size N` (or leave data.tokenizer unset "
                                 f"to build it from data.corpus)")
        with open(self.path, "rb") as f:
            blob = f.read()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=blob)
        except (RuntimeError, OSError, TypeError) as e:
            raise TokenizerError(f"{self.path} is not a valid sentencepiece model ({e}). It may be truncated or "
                                 f"corrupt: re-train it with `megaloop tokenizer`") from None
        if self.sp.vocab_size() <= 0:
            raise TokenizerError(f"{self.path} is not a valid sentencepiece model (empty vocabulary): "
                                 f"re-train it with `megaloop tokenizer`")
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{self.path} has no end-of-document (eos) id. Train the tokenizer with "
                                 f"`megaloop tokenizer`, which reserves one")
        # 64-bit fingerprint of the model file: datasets record it to detect a tokenizer mismatch.
        self.fingerprint = fingerprint(blob)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.vocab_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str) -> list[int]:
        if META in text:
            return self._encode_with_meta(text)
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: preprocess parallelises over worker processes, one core each.
        out = self.sp.encode([t for t in texts if META not in t], num_threads=1)
        it = iter(out)
        return [self._encode_with_meta(t) if META in t else next(it) for t in texts]

    def _encode_with_meta(self, text: str) -> list[int]:
        meta_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode("utf-8")]
        ids: list[int] = []
        for i, part in enumerate(text.split(META)):
            if i:
                ids.extend(meta_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # Accept lists, numpy arrays and tensors alike; sentencepiece wants Python ints.
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# Names an end-of-text token goes by in published tokenizers, tried in this order when no
# tokenizer_config.json beside the tokenizer names its eos_token.
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library.

    Documents are encoded with `add_special_tokens=False`: the tokenizer's own template (a bos
    before the text, an eos after it, as some post-processors add) is never applied, so no bos is
    added and megaloop appends the end-of-document id itself, once per document, exactly as for
    sentencepiece. That id is the `eos_token` named by a tokenizer_config.json beside the file
    (Hugging Face model folders have one), else the first of EOS_NAMES in the vocabulary.
    Round trips are lossless when the tokenizer is (byte-level BPE is; a normalizer that rewrites
    text, e.g. NFKC or lowercasing, is not).
    """

    def __init__(self, path: str):
        path = os.fspath(path)
        self.path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(self.path):
            raise TokenizerError(f"tokenizer not found: {self.path}. Point data.tokenizer (or --tokenizer) at a "
                                 f"tokenizer.json, a folder holding one, or a sentencepiece .model")
        from .documents import optional_import
        tokenizers = optional_import("tokenizers", f"the tokenizer {self.path}")
        with open(self.path, "rb") as f:
            blob = f.read()
        try:
            self.hf = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:
            raise TokenizerError(f"{self.path} is not a valid Hugging Face tokenizer.json ({e}). It may be "
                                 f"truncated or corrupt: save it again with tokenizer.save()") from None
        self._eos = self._find_eos()
        self.fingerprint = fingerprint(blob)

    def _find_eos(self) -> int:
        config = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
        named = None
        if os.path.isfile(config):
            try:
                named = json.load(open(config)).get("eos_token")
            except ValueError:
                named = None
            if isinstance(named, dict):
                named = named.get("content")
        for name in ([named] if named else []) + list(EOS_NAMES):
            i = self.hf.token_to_id(name)
            if i is not None:
                return int(i)
        raise TokenizerError(f"{self.path} has no end-of-text token (none of {', '.join(EOS_NAMES)}, and no "
                             f"tokenizer_config.json beside it naming an eos_token). Add one as a special token, "
                             f"e.g. tokenizer.add_special_tokens(['<|endoftext|>']), and save it again")

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch would spread over the library's own threads: preprocess's workers already
        # use one core each (TOKENIZERS_PARALLELISM is switched off in them).
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(int(i))
