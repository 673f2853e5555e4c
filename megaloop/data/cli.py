"""`megaloop tokenizer` and `megaloop preprocess`.

Bad input raises DatasetError (a ValueError), which the top-level CLI prints as one line.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional

from .documents import check_input_files
from .errors import DatasetError
from .preprocess import preprocess
from .tokenizer import MODEL_TYPES, Tokenizer, train_tokenizer

INPUT_HELP = ("corpus: .txt/.jsonl files (.gz or .zst compressed allowed), .parquet shards, folders of them "
              "(hub layout: --split picks files named after a split) and `datasets` save_to_disk folders")
TEXT_KEY_HELP = "JSON field (.jsonl) or column (.parquet, datasets folders) holding the text"
SPLIT_HELP = "split of a `datasets` folder or a hub-layout folder of shards (default: train)"


def tokenizer_main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="megaloop tokenizer",
        description="Train a lossless sentencepiece tokenizer (decode(encode(x)) == x) with an "
                    "end-of-document id, from .txt/.jsonl files (.gz/.zst allowed), .parquet shards, folders "
                    "of them and `datasets` save_to_disk folders. In .txt files, documents are separated by "
                    "a line holding only a form feed.")
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH", help=INPUT_HELP)
    ap.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model")
    ap.add_argument("--vocab-size", type=int, required=True, help="number of tokens (e.g. 4096, 32000)")
    ap.add_argument("--type", choices=MODEL_TYPES, default="unigram", help="sentencepiece model type")
    ap.add_argument("--text-key", default="text", help=TEXT_KEY_HELP)
    ap.add_argument("--split", default="train", help=SPLIT_HELP)
    args = ap.parse_args(argv)
    files = check_input_files(args.input, args.split)
    t0 = time.perf_counter()
    path = train_tokenizer(files, args.out, args.vocab_size, args.type, text_key=args.text_key, split=args.split)
    tok = Tokenizer(path)
    print(f"wrote {path}: {args.type}, {tok.vocab_size} tokens, eos id {tok.eos_id} "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0


def preprocess_main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="megaloop preprocess",
        description="Tokenize a corpus into DIR/train.{bin,idx} and DIR/valid.{bin,idx} "
                    "(memory-mapped datasets, one document per entry, each ending with the eos id), in one "
                    "streaming pass with --workers encoding processes. The split is by a hash of each "
                    "document's text, so it is stable.")
    ap.add_argument("--input", nargs="+", required=True, metavar="PATH", help=INPUT_HELP)
    ap.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                    help="a sentencepiece .model (from `megaloop tokenizer`) or a Hugging Face tokenizer.json "
                         "(or a folder holding one)")
    ap.add_argument("--out-dir", required=True, metavar="DIR")
    ap.add_argument("--format", choices=("megaloop", "megatron"), default="megaloop",
                    help="megaloop: megaloop's own files (default: they record the tokenizer and a checksum); "
                         "megatron: Megatron-LM's MMIDIDX pair, readable by megatron-core")
    ap.add_argument("--valid-fraction", type=float, default=0.02, help="share of documents held out")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="encoding processes (default: every core)")
    ap.add_argument("--text-key", default="text", help=TEXT_KEY_HELP)
    ap.add_argument("--split", default="train", help=SPLIT_HELP)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not 0.0 < args.valid_fraction < 1.0:
        raise DatasetError(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    if args.workers < 1:
        raise DatasetError(f"--workers must be >= 1, got {args.workers}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise DatasetError(f"--out-dir {args.out_dir} exists and is not a directory")
    files = check_input_files(args.input, args.split)
    Tokenizer(args.tokenizer)  # fail on a bad model before reading the corpus
    t0 = time.perf_counter()
    preprocess(files, args.tokenizer, args.out_dir, args.valid_fraction, args.workers, args.text_key, log=print,
               split=args.split, fmt=args.format, progress=not args.no_progress)
    print(f"done in {time.perf_counter() - t0:.1f}s: {os.path.join(args.out_dir, 'train')} and "
          f"{os.path.join(args.out_dir, 'valid')} (use them as data.train / data.valid)")
    return 0
