"""`megaloop checkpoint`: list a run's complete checkpoints, or convert one of the format before DCP."""
from __future__ import annotations

import argparse
import json
import os

from .. import checkpoint as ckpt
from ..errors import UserError


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
        from ..convert import convert
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
