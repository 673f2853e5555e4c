"""`megaloop eval`: validation loss of a trained run (or an export folder) at several r."""
from __future__ import annotations

import json
import os
from typing import Optional

from . import checkpoint as ckpt
from .data.loader import eval_batches
from .data.prepare import ensure_prepared
from .parallel import local_engine
from .pretrained import load_pretrained
from .train import resolve_device


def evaluate_run(path: str, recur: list[int], max_tokens: Optional[int] = None, log=print) -> dict:
    """`megaloop eval`: val loss at several r of a run (its latest checkpoint) or an export folder.
    For a run directory the losses are also merged into its summary.json (val_loss_by_r)."""
    model, cfg, _ = load_pretrained(path)
    engine = local_engine(cfg, model, resolve_device(cfg))
    data = ensure_prepared(cfg.data, cfg.model.vocab_size, log=log)
    tokens = max_tokens or cfg.train.eval_tokens
    by_r = {}
    for r in recur:
        by_r[str(r)] = engine.eval_loss(eval_batches(data.valid, cfg.model.seq_len, cfg.train.micro_batch_size, tokens), r)
        log(f"r={r}: val_loss={by_r[str(r)]:.4f}")
    if os.path.isdir(ckpt.ckpt_root(path)):
        summary_path = os.path.join(path, "summary.json")
        summary = {}
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        summary.setdefault("val_loss_by_r", {}).update(by_r)
        ckpt.write_atomic(summary_path, json.dumps(summary, indent=2).encode())
    return by_r
