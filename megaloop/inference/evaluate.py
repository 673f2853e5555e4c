"""`megaloop eval RUN --exit ...`: validation loss when every token picks its own depth.

The validation windows are decoded teacher-forced, one token per row per step, through the
loop-aware cache: each token exits by the rule (up to --max-recur) and later tokens attend to it
as decoding would (skipped recurrences repeat its last entries). That is the loss the model gets
in generation, and the mean recurrences it spends for it. The same decoding without exit, at a
kv budget, measures the cost of the budget (benchmarks/generate.py).

Results go to RUN/exit_eval.json; `--plot FILE` draws loss against mean recurrences: one curve
per criterion over its thresholds, beside the fixed-depth losses at r = 1..max_recur.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..config import recurrences
from ..model import IGNORE_INDEX
from .decode import Decoder
from .exit import ExitRule


@torch.no_grad()
def decode_eval(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], depth: int,
                exit_rule: Optional[ExitRule] = None, kv_budget: Optional[int] = None,
                num_recur: Optional[int] = None) -> dict:
    """Teacher-forced cached decoding of (x, y) windows: {val_loss, mean_recurrences, tokens}.
    depth: the most recurrences a token runs (all of them without exit_rule)."""
    model.eval()
    nll, n, rec = 0.0, 0, 0
    for x, y in batches:
        B, T = x.shape
        dec = Decoder(model, B, T, depth, kv_budget)
        for t in range(T):
            out = dec.forward(x[:, t:t + 1], depth, exit_rule)
            tgt = y[:, t]
            mask = tgt != -100
            nll += float(F.cross_entropy(out.logits, tgt, ignore_index=-100, reduction="sum"))
            rec += int(out.recurrences[mask].sum())
            n += int(mask.sum())
    return {"val_loss": nll / max(n, 1), "mean_recurrences": rec / max(n, 1), "tokens": n}


def exit_sweep(path: str, rules: list[ExitRule], max_recur: Optional[int], tokens: Optional[int],
               plot: Optional[str] = None, log=print) -> dict:
    """Val loss and mean recurrences for each rule, plus the fixed-depth losses for reference."""
    from ..data.loader import eval_batches
    from ..data.prepare import ensure_prepared
    from ..pretrained import load_pretrained

    model, cfg, _ = load_pretrained(path)
    data = ensure_prepared(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
    depth = recurrences(max_recur, cfg.model.num_recur)
    tokens = tokens or cfg.train.eval_tokens
    batches = lambda: eval_batches(data.valid, cfg.model.seq_len, cfg.train.micro_batch_size, tokens)  # noqa: E731
    fixed = {}
    with torch.no_grad():
        for r in range(1, depth + 1):
            tot = cnt = 0
            for x, y in batches():
                n = int((y != IGNORE_INDEX).sum())  # the loss is a mean over these targets
                tot += float(model(x, y, num_recur=r)) * n
                cnt += n
            fixed[str(r)] = tot / cnt
    log(f"fixed depth (r = 1..{depth}): " + ", ".join(f"{r}: {v:.4f}" for r, v in fixed.items()))
    log(f"{'exit':<22} {'val_loss':>9} {'mean_recur':>10}")
    rows = []
    for rule in rules:
        res = decode_eval(model, batches(), depth, rule)
        rows.append({"criterion": rule.criterion, "threshold": rule.threshold, **res})
        log(f"{str(rule):<22} {res['val_loss']:>9.4f} {res['mean_recurrences']:>10.3f}")
    result = {"run": os.path.abspath(path), "max_recur": depth, "trained_r": cfg.model.num_recur,
              "tokens": rows[0]["tokens"] if rows else None, "fixed_depth": fixed, "exit": rows}
    ckpt.write_atomic(os.path.join(path, "exit_eval.json"), json.dumps(result, indent=2).encode())
    if plot:
        plot_exit(result, plot)
        log(f"plot: {plot}")
    return result


def plot_exit(result: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = result["fixed_depth"]
    ax.plot([int(r) for r in fixed], list(fixed.values()), "k--o", label="fixed depth r")
    for crit in dict.fromkeys(row["criterion"] for row in result["exit"]):
        pts = sorted((row["mean_recurrences"], row["val_loss"], row["threshold"])
                     for row in result["exit"] if row["criterion"] == crit)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=f"exit: {crit}")
        for x, y, t in pts:
            ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("mean recurrences per token")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{os.path.basename(result['run'].rstrip('/'))}: loss vs recurrences "
                 f"(trained r={result['trained_r']}, max {result['max_recur']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
