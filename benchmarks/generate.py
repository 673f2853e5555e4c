"""Decoding speed with and without the loop-aware KV cache, and the cost of each kv budget.

    python benchmarks/generate.py                         # configs/default.yaml shape, random weights
    python benchmarks/generate.py --run runs/default      # a trained run: real prompt, real val loss
    python benchmarks/generate.py --recur 1,4 --new-tokens 128 --out bench.json

Prints one JSON object:
  speed    per r: tokens/s generating --new-tokens greedy tokens from a --prompt-tokens prompt,
           recomputing the window for every token (`uncached`, LoopedLM.generate(use_cache=False))
           and over the cache (`cached`), the speed-up, whether both gave the same tokens, and the
           cache's bytes. Each variant runs --repeats times alternately; the median time counts.
  budgets  per r and kv budget k (r, then halving down to 1): the cache's bytes; the greedy
           agreement with the exact cache (share of the new tokens equal position by position, and
           the first position that differs); and the teacher-forced validation loss of cached
           decoding at that budget (with --run) or on random tokens (without), with its
           difference to the exact cache (k = r, which equals the full forward).
Threads: --threads (default 1: decoding is many small ops, and on a shared 2-core machine one
thread is both faster and steadier).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaloop.config import load_config  # noqa: E402
from megaloop.inference.evaluate import decode_eval  # noqa: E402
from megaloop.inference.generate import generate  # noqa: E402
from megaloop.model import LoopedLM  # noqa: E402


def load(args):
    if args.run:
        from megaloop.data.loader import eval_batches
        from megaloop.data.prepare import ensure_prepared
        from megaloop.export import load_pretrained
        model, cfg, _ = load_pretrained(args.run)
        valid = ensure_prepared(cfg.data, cfg.model.vocab_size, log=lambda *a: None).valid
        x, y = next(eval_batches(valid, cfg.model.seq_len, args.eval_rows, args.eval_rows * cfg.model.seq_len))
        return model, cfg.model, (x, y), "validation split of " + args.run
    cfg = load_config(args.config, args.overrides, raw=None).model
    torch.manual_seed(0)
    model = LoopedLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.eval_rows, cfg.seq_len + 1), generator=g)
    return model, cfg, (x[:, :-1], x[:, 1:]), "random tokens (random weights)"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def speed(model, prompt, r, n_new, repeats):
    times = {"uncached": [], "cached": []}
    outs = {}
    for _ in range(repeats):
        dt, outs["uncached"] = timed(lambda: model.generate(prompt, n_new, num_recur=r, use_cache=False))
        times["uncached"].append(dt)
        dt, gen = timed(lambda: generate(model, prompt, n_new, num_recur=r))
        times["cached"].append(dt)
        outs["cached"] = gen.tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"uncached_tokens_per_s": n_new / med["uncached"], "cached_tokens_per_s": n_new / med["cached"],
            "speedup": med["uncached"] / med["cached"],
            "same_tokens": bool(torch.equal(outs["uncached"], outs["cached"])),
            "cache_bytes": gen.cache["bytes"], "seconds": med}


def budgets(model, prompt, xy, r, n_new):
    ks = sorted({r, *[max(1, r // 2 ** i) for i in range(8)]}, reverse=True)
    exact_tokens = exact_loss = None
    rows = []
    for k in ks:
        gen = generate(model, prompt, n_new, num_recur=r, kv_budget=k)
        new = gen.tokens[:, prompt.size(1):]
        loss = decode_eval(model, [xy], r, kv_budget=k)["val_loss"]
        if k == r:
            exact_tokens, exact_loss = new, loss
        diff = (new != exact_tokens).nonzero()
        rows.append({"kv_budget": k, "cache_bytes": gen.cache["bytes"],
                     "greedy_agreement": float((new == exact_tokens).float().mean()),
                     "first_difference": int(diff[0, 1]) if len(diff) else None,
                     "loss": loss, "loss_increase": loss - exact_loss})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a run directory or export folder (default: random weights)")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--recur", default="1,4,8")
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--budget-new-tokens", type=int, default=128, help="greedy tokens per budget agreement check")
    ap.add_argument("--eval-rows", type=int, default=4, help="validation windows for each budget's loss")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg, xy, source = load(args)
    prompt = xy[0][:1, :args.prompt_tokens]
    rs = [int(r) for r in args.recur.split(",")]
    result = {"benchmark": "generate", "model": {k: getattr(cfg, k) for k in (
        "d_model", "n_head", "n_kv_head", "n_prelude", "n_recur_block", "n_coda", "num_recur", "seq_len",
        "vocab_size", "input_injection")}, "data": source, "threads": args.threads, "batch": 1,
        "prompt_tokens": prompt.size(1), "new_tokens": args.new_tokens, "device": "cpu", "dtype": "float32",
        "speed": {}, "budgets": {}}
    with torch.no_grad():
        for r in rs:
            result["speed"][str(r)] = speed(model, prompt, r, args.new_tokens, args.repeats)
            print(f"r={r}: {result['speed'][str(r)]['speedup']:.1f}x", file=sys.stderr)
        for r in rs:
            result["budgets"][str(r)] = budgets(model, prompt, xy, r, args.budget_new_tokens)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
