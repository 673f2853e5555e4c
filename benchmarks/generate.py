"""Decoding speed with and without the loop-aware KV cache, and the cost of each kv budget.

    python benchmarks/generate.py                         # configs/default.yaml shape, random weights
    python benchmarks/generate.py --run runs/default      # a trained run: real prompt, real val loss
    python benchmarks/generate.py --recur 1,4 --new-tokens 128 --out bench.json

Prints one JSON object:
  speed    per r: tokens/s generating --new-tokens greedy tokens from a --prompt-tokens prompt,
           recomputing the window for every token (`uncached`: LoopedLM.generate,
           whose head sees only the last position) and over the cache (`cached`:
           inference.generate, decoder construction and prefill included). The two alternate
           in one process, a whole generation each per round (order swapped every round), so a
           noisy machine slows both alike; --rounds rounds give the medians: tokens/s, `speedup`
           (the median of the per-round ratios of wall time) and `cpu_speedup` (the same in this
           thread's CPU time, which a loaded machine disturbs less). Also: whether both gave the
           same tokens, ms per token, the cache's bytes, the
           load average before and after, and `flops_ratio`: the speed-up if both sides ran at
           the same FLOP rate (the uncached side does ~window/2 times the arithmetic), beside the
           GFLOP/s each side reaches (batched matmuls vs one-row products and per-op overhead).
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

from megaloop.accounting import block_params, injection_flop_params  # noqa: E402
from megaloop.config import load_config  # noqa: E402
from megaloop.inference.evaluate import decode_eval  # noqa: E402
from megaloop.inference.generate import generate  # noqa: E402
from megaloop.mfu import cpu_model  # noqa: E402
from megaloop.model import LoopedLM  # noqa: E402


def load(args):
    if args.run:
        from megaloop.data.loader import eval_batches
        from megaloop.data.prepare import ensure_prepared
        from megaloop.pretrained import load_pretrained
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


class Clock:
    """Wall and thread-CPU seconds spent inside `timed` calls."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def timed(self, fn):
        w, c = time.perf_counter(), time.thread_time()
        out = fn()
        self.wall += time.perf_counter() - w
        self.cpu += time.thread_time() - c
        return out


def one_round(model, prompt, r, n_new, cached_first):
    """One round: a whole greedy generation on each side, each on its own clock (the order
    alternates between rounds). Uncached: LoopedLM.generate; cached:
    inference.generate (decoder and cache built, prompt prefilled, one step per token)."""
    sides = {}
    for side in (("cached", "uncached") if cached_first else ("uncached", "cached")):
        clock = Clock()
        if side == "cached":
            gen = clock.timed(lambda: generate(model, prompt, n_new, num_recur=r))
            sides[side] = (clock, gen.tokens, gen.cache["bytes"])
        else:
            ids = clock.timed(lambda: model.generate(prompt, n_new, num_recur=r))
            sides[side] = (clock, ids, None)
    return sides["uncached"][0], sides["cached"][0], sides["uncached"][1], sides["cached"][1], sides["cached"][2]


def forward_flops(cfg, r, tokens, keys):
    """Forward FLOPs of `tokens` positions at r recurrences, each attending to `keys` keys on
    average, with the head on the last position only (as both decoders run it)."""
    layers = cfg.n_prelude + cfg.n_coda + r * cfg.n_recur_block
    per_token = 2 * (layers * block_params(cfg) + r * injection_flop_params(cfg))
    return tokens * per_token + 4 * cfg.n_head * cfg.hdim * keys * tokens * layers + 2 * cfg.d_model * cfg.vocab_size


def decode_flops(cfg, r, prompt_tokens, n_new):
    """(uncached, cached) forward FLOPs of one round: the uncached side recomputes its window
    (causal: (T + 1) / 2 keys per position on average), the cached side prefills once and then
    runs one position per token against the cached keys."""
    L = cfg.seq_len
    unc = sum(forward_flops(cfg, r, min(prompt_tokens + n, L), (min(prompt_tokens + n, L) + 1) / 2)
              for n in range(n_new))
    cac = forward_flops(cfg, r, prompt_tokens, (prompt_tokens + 1) / 2) + sum(
        forward_flops(cfg, r, 1, min(prompt_tokens + n + 1, L)) for n in range(n_new - 1))
    return unc, cac


def speed(model, prompt, r, n_new, rounds):
    one_round(model, prompt, r, 8, False)  # warm-up: first calls, allocator
    runs = [one_round(model, prompt, r, n_new, cached_first=i % 2 == 1) for i in range(rounds)]
    med = statistics.median
    same = all(torch.equal(u_ids, c_ids) for _, _, u_ids, c_ids, _ in runs)
    diff = (runs[0][2] != runs[0][3]).nonzero()
    f_unc, f_cac = decode_flops(model.cfg, r, prompt.size(1), n_new)
    return {"uncached_tokens_per_s": med(n_new / u.wall for u, *_ in runs),
            "cached_tokens_per_s": med(n_new / c.wall for _, c, *_ in runs),
            "speedup": med(u.wall / c.wall for u, c, *_ in runs),
            "cpu_speedup": med(u.cpu / c.cpu for u, c, *_ in runs),
            "round_speedups": [round(u.wall / c.wall, 2) for u, c, *_ in runs],
            "uncached_ms_per_token": med(1e3 * u.wall / n_new for u, *_ in runs),
            "cached_ms_per_token": med(1e3 * c.wall / n_new for _, c, *_ in runs),
            "cached_cpu_ms_per_token": med(1e3 * c.cpu / n_new for _, c, *_ in runs),
            "same_tokens": same,
            "first_difference": int(diff[0, 1]) - prompt.size(1) if len(diff) else None,
            "cache_bytes": runs[0][4], "rounds": rounds,
            # what the speed-up would be if both sides ran at the same FLOP rate, and the rates
            "flops_ratio": f_unc / f_cac,
            "uncached_gflops_per_s": med(f_unc / u.wall for u, *_ in runs) / 1e9,
            "cached_gflops_per_s": med(f_cac / c.wall for _, c, *_ in runs) / 1e9}


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
    ap.add_argument("--rounds", type=int, default=3, help="side-by-side rounds per r (medians are reported)")
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
        "cpu": cpu_model(), "load_average_before": os.getloadavg(), "speed": {}, "budgets": {}}
    with torch.no_grad():
        for r in rs:
            res = result["speed"][str(r)] = speed(model, prompt, r, args.new_tokens, args.rounds)
            print(f"r={r}: {res['speedup']:.1f}x wall (rounds {res['round_speedups']}), "
                  f"{res['cpu_speedup']:.1f}x cpu; {res['cached_ms_per_token']:.2f} vs "
                  f"{res['uncached_ms_per_token']:.2f} ms/token", file=sys.stderr)
        for r in rs:
            result["budgets"][str(r)] = budgets(model, prompt, xy, r, args.budget_new_tokens)
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
