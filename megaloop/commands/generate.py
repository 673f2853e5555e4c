"""`megaloop generate`: continue a prompt with a trained run or an export folder."""
from __future__ import annotations

import argparse
import math

import torch

from ..errors import UserError
from ..pretrained import load_pretrained, tokenizer_path


def check_generate_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1 (or left out for the whole vocabulary), got {args.top_k}")
    if args.recur is not None and args.recur < 1:
        raise UserError(f"--recur must be >= 1, got {args.recur}")


def generate_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop generate", description="Continue a prompt with a trained model.")
    ap.add_argument("path", help="a run directory or an export folder")
    ap.add_argument("--prompt", default="", help="text to continue")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--recur", type=int, default=None, help="recurrences at inference (default: the trained r)")
    ap.add_argument("--seed", type=int, default=0)
    from ..inference.cli import add_decoding_args, decode
    add_decoding_args(ap)
    args = ap.parse_args(argv)
    check_generate_args(args)
    from ..data.tokenizer import Tokenizer
    model, cfg, tok_path = load_pretrained(args.path)
    tok = Tokenizer(tok_path or tokenizer_path(cfg))
    ids = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    idx = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    out = decode(model, idx, args, generator=gen)
    print(args.prompt + tok.decode(out[0, len(ids) if args.prompt else 1:].tolist()))
    return 0
