"""Generate the synthetic example table analysis/example_runs.csv from the reference law.

The table is SYNTHETIC: losses are the reference study's fitted law (E=1.56773, A=28.027,
alpha=0.19924, B=915.82, beta=0.36863, phi=0.46) evaluated on the reference iso-depth grid, times
multiplicative lognormal noise (sigma 0.5 %). It exists so the fitter, the notebook and the tests
have a realistic 116-run table with a known truth.

Accounting (self-contained here so the table does not depend on the model code):
  d = 64*s rounded up to a multiple of 128, head dim 128, n_head = d/128;
  block = 12 d^2 (attention 4 d^2 + ReLU^2 MLP 8 d^2) + 2 d (two RMSNorm scales);
  N_once = (prelude 2 + coda 2) blocks + 3 d (embedding, recurrence and final norm scales);
  N_rec = 16/r blocks, + 2 d^2 linear injection when r > 1;
  FLOPs/token = 6 (N_once + d V) + 6 r N_rec + 20 layer applications * 12 n_head 128 seq_len,
  with V = 32000, seq_len = 2048 (full backprop: every recurrence carries gradients);
  tokens = budget / FLOPs-per-token.

Usage: python -m megaloop.analysis.make_example [--out PATH] [--seed S] [--noise 0.005]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

REFERENCE = {"E": 1.56773, "A": 28.027, "alpha": 0.19924, "B": 915.82, "beta": 0.36863, "phi": 0.46}
BUDGETS: dict[float, tuple[int, ...]] = {
    4.64e17: (6, 8, 10, 12),
    1e18: (6, 8, 10, 12, 14),
    2.15e18: (8, 10, 12, 14, 16),
    4.64e18: (10, 12, 14, 16, 18, 20),
    1e19: (12, 16, 18, 20, 24),
    2.15e19: (18, 24, 28, 34),
}
RS = (1, 2, 4, 8)
VOCAB, SEQ_LEN, HEAD_DIM = 32000, 2048, 128


def accounting(s: int, r: int) -> tuple[float, float, float]:
    """(n_once, n_rec, flops_per_token) for width multiplier s at recurrence r."""
    d = math.ceil(64 * s / 128) * 128
    block = 12 * d * d + 2 * d
    n_once = 4 * block + 3 * d
    n_rec = (16 // r) * block + (2 * d * d if r > 1 else 0)
    n_head = d // HEAD_DIM
    attn = 20 * 12 * n_head * HEAD_DIM * SEQ_LEN
    fpt = 6 * (n_once + d * VOCAB) + 6 * r * n_rec + attn
    return float(n_once), float(n_rec), float(fpt)


def law(n_once, n_rec, r, tokens, E, A, alpha, B, beta, phi):
    """The looped law, vectorised."""
    n_eff = np.asarray(n_once) + np.asarray(r, float) ** phi * np.asarray(n_rec)
    return E + A * n_eff ** (-alpha) + B * np.asarray(tokens, float) ** (-beta)


def grid_table(rs=RS, budgets: dict[float, tuple[int, ...]] | None = None) -> pd.DataFrame:
    """The reference iso-depth grid (29 runs per r) without losses."""
    rows = []
    for r in rs:
        for budget, sizes in (budgets or BUDGETS).items():
            for s in sizes:
                n_once, n_rec, fpt = accounting(s, r)
                rows.append({"run": f"r{r}_s{s}_c{budget:.3g}", "n_once": n_once, "n_rec": n_rec,
                             "r": r, "tokens": budget / fpt, "flops": budget})
    return pd.DataFrame(rows)


def synthetic_table(seed: int = 0, noise: float = 0.005, params: dict | None = None,
                    rs=RS, budgets: dict[float, tuple[int, ...]] | None = None) -> pd.DataFrame:
    """Grid plus losses drawn from the law with multiplicative lognormal noise."""
    p = dict(REFERENCE, **(params or {}))
    df = grid_table(rs, budgets)
    clean = law(df.n_once, df.n_rec, df.r, df.tokens, **p)
    rng = np.random.default_rng(seed)
    df["loss"] = clean * np.exp(noise * rng.standard_normal(len(df)))
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("example_runs.csv")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.005)
    args = ap.parse_args(argv)
    df = synthetic_table(args.seed, args.noise)
    df.to_csv(args.out, index=False, float_format="%.6g")
    print(f"wrote {len(df)} runs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
