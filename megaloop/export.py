"""Export, generation and checkpoint inspection.

`megaloop export RUN_DIR --out DIR` writes DIR/model.safetensors (consolidated weights of the plain
single-process model, whatever layout trained it), DIR/config.yaml and DIR/tokenizer.model.
`load_pretrained` reads either such a folder or a run directory (its latest checkpoint), so
`megaloop eval` and `megaloop generate` work on both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from typing import Optional

import torch

from . import checkpoint as ckpt
from .config import Config, load_config
from .errors import UserError
from .model import LoopedLM


def _tokenizer_for(cfg: Config, log=lambda *a: None) -> str:
    from .data.prepare import ensure_prepared
    return ensure_prepared(cfg.data, cfg.model.vocab_size, log=log).tokenizer_path


def load_pretrained(path: str, device: str = "cpu") -> tuple[LoopedLM, Config, Optional[str]]:
    """(model in eval mode, config, tokenizer path or None) from an export folder or a run dir."""
    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path} is not a run directory or an export folder (no config.yaml)")
    cfg = load_config(cfg_path)
    model = LoopedLM(cfg.model)
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_file
        try:
            state = load_file(weights)
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
            raise UserError(f"{weights} is corrupt ({e}); re-export it with megaloop export") from None
        tok = os.path.join(path, "tokenizer.model")
        tok = tok if os.path.isfile(tok) else None
    else:
        latest = ckpt.latest_path(path)
        if latest is None:
            raise UserError(f"{path} has no complete checkpoint yet; train it first")
        from .parallel.dcp_state import read_weights
        state, tok = read_weights(latest), None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"the weights in {path} do not fit its config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, tok


def export(run_dir: str, out: str, force: bool = False) -> str:
    ckpt.check_out_dir(out, [run_dir], force)
    model, cfg, _ = load_pretrained(run_dir)
    from safetensors.torch import save_file
    with ckpt.atomic_output_dir(out, prefix=".export_") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "megaloop", "source": os.path.abspath(run_dir)})
        shutil.copy(os.path.join(run_dir, "config.yaml"), os.path.join(tmp, "config.yaml"))
        shutil.copy(_tokenizer_for(cfg), os.path.join(tmp, "tokenizer.model"))
    return out


def export_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop export", description="Consolidated safetensors weights of a run.")
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True, help="output folder (model.safetensors, config.yaml, tokenizer.model)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--format", default="safetensors", help="safetensors (default) or hf: a Hugging Face transformers "
                    "folder (config.json, weights, modeling code, tokenizer; megaloop.inference.hf_export)")
    args = ap.parse_args(argv)
    if args.format not in ("safetensors", "hf"):
        raise UserError(f"unknown export format {args.format!r}; use --format safetensors or --format hf")
    if args.format == "hf":
        from .inference.hf_export import export_hf
        print(f"exported (Hugging Face) to {export_hf(args.run_dir, args.out, args.force)}")
        return 0
    print(f"exported to {export(args.run_dir, args.out, args.force)}")
    return 0


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
    from .inference.cli import add_decoding_args, decode
    add_decoding_args(ap)
    args = ap.parse_args(argv)
    check_generate_args(args)
    from .data.tokenizer import Tokenizer
    model, cfg, tok_path = load_pretrained(args.path)
    tok = Tokenizer(tok_path or _tokenizer_for(cfg))
    ids = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    idx = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    out = decode(model, idx, args, generator=gen)
    print(args.prompt + tok.decode(out[0, len(ids) if args.prompt else 1:].tolist()))
    return 0


def checkpoint_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megaloop checkpoint", description="Inspect or convert the checkpoints of a run.")
    sub = ap.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="list complete checkpoints and the latest")
    info.add_argument("run_dir")
    conv = sub.add_parser("convert", help="convert a checkpoint of the format before DCP checkpoints",
                          description="Read a checkpoint written before DCP checkpoints (model.pt with "
                                      "optim_full.pt or a single process's optim.pt) and write it as a DCP "
                                      "checkpoint, which any TP / PP / DP / ZeRO layout resumes from. A run "
                                      "directory becomes a new run directory (resume it with `megaloop train "
                                      "OUT/config.yaml --resume`), a checkpoint folder a new checkpoint folder.")
    conv.add_argument("src", help="a run directory (its latest checkpoint) or a checkpoint folder")
    conv.add_argument("--out", required=True, help="output run directory or checkpoint folder")
    conv.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    if args.action == "convert":
        from .convert import convert
        print(f"converted to {convert(args.src, args.out, args.force)}")
        return 0
    if not os.path.isdir(args.run_dir):
        raise UserError(f"{args.run_dir} does not exist or is not a folder: pass a run directory (train.run_dir)")
    steps = ckpt.list_complete(args.run_dir)
    latest = ckpt.latest_path(args.run_dir)
    if not steps:
        print(f"{args.run_dir}: no checkpoints (a run writes them every train.save_every steps and at its end)")
        return 0
    print(json.dumps({"run_dir": args.run_dir, "complete": steps,
                      "latest": os.path.basename(latest) if latest else None,
                      "meta": {k: v for k, v in ckpt.read_meta(latest).items() if k != "config"} if latest else None}))
    return 0
