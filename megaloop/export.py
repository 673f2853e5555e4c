"""`megaloop export`: a run's consolidated weights as safetensors (or a Hugging Face folder).

`megaloop export RUN_DIR --out DIR` writes DIR/model.safetensors (consolidated weights of the plain
single-process model, whatever layout trained it), DIR/config.yaml and DIR/tokenizer.model.
megaloop.pretrained reads either such a folder or a run directory (its latest checkpoint), so
`megaloop eval` and `megaloop generate` work on both.
"""
from __future__ import annotations

import argparse
import os
import shutil

from . import checkpoint as ckpt
from .errors import UserError
from .pretrained import load_pretrained, tokenizer_path


def export(run_dir: str, out: str, force: bool = False) -> str:
    ckpt.check_out_dir(out, [run_dir], force)
    model, cfg, _ = load_pretrained(run_dir)
    from safetensors.torch import save_file
    with ckpt.atomic_output_dir(out, prefix=".export_") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "megaloop", "source": os.path.abspath(run_dir)})
        shutil.copy(os.path.join(run_dir, "config.yaml"), os.path.join(tmp, "config.yaml"))
        shutil.copy(tokenizer_path(cfg), os.path.join(tmp, "tokenizer.model"))
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
