"""megaloop's lossless sentencepiece tokenizer for Hugging Face transformers.

decode(encode(text)) == text for every string: identity normalisation, no dummy prefix, byte
fallback, and a literal U+2581 (sentencepiece's space symbol) is sent as its UTF-8 byte pieces.
No BOS is added; documents end with EOS.
"""
from __future__ import annotations

import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

META = "\u2581"


class MegaloopTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, eos_token="</s>", unk_token="<unk>", pad_token=None, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos_token, unk_token=unk_token, pad_token=pad_token or eos_token, **kwargs)

    @property
    def vocab_size(self):
        return self.sp.vocab_size()

    def get_vocab(self):
        return {self.sp.id_to_piece(i): i for i in range(self.sp.vocab_size())}

    def _ids(self, text):
        if META not in text:
            return self.sp.encode(text)
        meta = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode("utf-8")]
        ids = []
        for i, part in enumerate(text.split(META)):
            ids += meta if i else []
            ids += self.sp.encode(part) if part else []
        return ids

    def _tokenize(self, text, **kwargs):
        return [self.sp.id_to_piece(i) for i in self._ids(text)]

    def _convert_token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens):
        return self.sp.decode([self.sp.piece_to_id(t) for t in tokens])

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
