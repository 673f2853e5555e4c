"""Controls of a study: which rows enter the law, and what the controls measure on their own.

A study may carry runs that are not a probe of their own:
- **folded** variants (`--fold depth1=baseline`): fixed-width depth controls, r = 1 models with
  fewer unique recurrent blocks. They are the baseline's model family at r = 1 with a smaller N, so
  they enter the law as baseline rows: N varies at a fixed width, which pins alpha and A apart
  from phi instead of borrowing the slope across widths (which also carries embedding effects).
- **contrast** variants (`--control plain=baseline`): another model at the same cells, e.g. the
  adapter-free r = 1 model. They stay out of the law and are reported as paired loss differences
  against the reference variant at matching cells (same width, r, budget and seed).

`depth_equivalents` reads the depth controls directly: at each width, budget and seed, the loss of
the r = 1 models with k = 1, 2, ..., K unique blocks, and where each looped model (k = K / r blocks
run r times) falls on that curve: the number of unique blocks at r = 1 that would give its loss at
the same compute (linear in log k between the measured k, extrapolated past the ends). It is a
compute-matched reading (fewer blocks train on more tokens at one budget), not the law's
parameter-matched phi, and is reported beside it as a model-free check.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

from .table import budget_of

MATCH = ("n_once", "budget", "seed")   # a width (n_once), a budget and a seed: one matched cell


def parse_pairs(pairs: Iterable[str], flag: str) -> dict[str, str]:
    """['depth1=baseline', ...] -> {'depth1': 'baseline'}; a malformed pair is a ValueError naming it."""
    out = {}
    for p in pairs or ():
        name, sep, into = p.partition("=")
        if not sep or not name or not into or name == into:
            raise ValueError(f"{flag} {p!r}: expected VARIANT=OTHER, e.g. {flag} depth1=baseline")
        out[name] = into
    return out


def _with_match(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out["budget"] = budget_of(out).astype(float)
    if "seed" not in out.columns:
        out["seed"] = 0
    return out


def law_table(df: pd.DataFrame, fold: dict[str, str], contrast: dict[str, str]) -> pd.DataFrame:
    """The rows the law is fitted to: folded variants relabelled, contrast variants left out."""
    missing = sorted((set(fold) | set(contrast)) - set(df["variant"].astype(str)))
    if missing:
        raise ValueError(f"variant {missing[0]!r} named by --fold/--control is not in the table "
                         f"(variants: {', '.join(sorted(set(df['variant'].astype(str))))})")
    out = df[~df["variant"].isin(list(contrast))].copy()
    out["variant"] = out["variant"].replace(fold)
    return out.reset_index(drop=True)


def paired_contrasts(df: pd.DataFrame, contrast: dict[str, str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per contrast variant: loss(variant) - loss(reference) at matching cells (same width, r, budget,
    seed), their mean with a bootstrap 95 % interval over matched cells, and the mean per budget."""
    d = _with_match(df)
    rng = np.random.default_rng(seed)
    out = []
    for name, ref in contrast.items():
        a = d[d.variant == name]
        b = d[d.variant == ref]
        m = a.merge(b, on=list(MATCH) + ["r"], suffixes=("", "_ref"))
        if m.empty:
            out.append({"variant": name, "reference": ref, "n_pairs": 0,
                        "line": f"{name} vs {ref}: no matching cells (same width, r, budget and seed)"})
            continue
        diff = (m["loss"] - m["loss_ref"]).to_numpy()
        boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
        lo, hi = np.percentile(boots, [2.5, 97.5])
        by_budget = {f"{b:.3g}": float(g) for b, g in m.assign(d=diff).groupby("budget")["d"].mean().items()}
        out.append({"variant": name, "reference": ref, "n_pairs": int(len(diff)), "mean": float(diff.mean()),
                    "ci": [float(lo), float(hi)], "by_budget": by_budget,
                    "line": f"{name} - {ref}: {diff.mean():+.4f} nats [{lo:+.4f}, {hi:+.4f}] over {len(diff)} "
                            f"matched cells (positive: {name} is worse)"})
    return out


def _blocks_at(loss: float, ks: np.ndarray, losses: np.ndarray) -> float:
    """The k at which the r = 1 depth curve reaches `loss`: a least-squares line of loss in log k
    through the measured k (robust to one noisy point), inverted. NaN when the curve does not fall
    with k (more unique blocks did not help at this cell: no reading)."""
    if len(ks) < 2:
        return float("nan")
    slope, icpt = np.polyfit(np.log(ks), losses, 1)
    if slope >= 0:
        return float("nan")
    return float(math.exp((loss - icpt) / slope))


def _total_blocks(d: pd.DataFrame, r1: pd.DataFrame, depth_variants: dict[str, int]) -> int:
    """The baseline's unique recurrent blocks at r = 1, from the parameter counts: n_rec less the
    adapter is k blocks for a depth control with k blocks, at the same width."""
    for v, k in depth_variants.items():
        m = d[d.variant == v].merge(r1, on="n_once", suffixes=("", "_b"))
        if not m.empty:
            row = m.iloc[0]
            a = float(row["n_adapter"]) if "n_adapter" in m.columns and pd.notna(row["n_adapter"]) else 0.0
            ab = float(row["n_adapter_b"]) if "n_adapter_b" in m.columns and pd.notna(row["n_adapter_b"]) else 0.0
            return int(round(k * (float(row["n_rec_b"]) - ab) / (float(row["n_rec"]) - a)))
    raise ValueError("depth controls: no depth-control run shares a width with the baseline's r = 1 runs")


def depth_equivalents(df: pd.DataFrame, depth_variants: dict[str, int], base: str = "baseline",
                      total_blocks: int | None = None) -> dict:
    """Where each looped baseline model lands on the r = 1 depth curve of its cell (see the module
    docstring). depth_variants: {variant: unique recurrent blocks}; the baseline's r = 1 has
    total_blocks. Returns per-r medians of k_eq / (unique blocks) and the implied exponent
    log(k_eq / k_unique) / log(r), with the per-cell rows."""
    d = _with_match(df)
    r1 = d[(d.variant == base) & (d.r == 1)]
    if total_blocks is None:
        total_blocks = _total_blocks(d, r1, depth_variants)
    curves = [r1.assign(k=total_blocks)] + [d[d.variant == v].assign(k=k) for v, k in depth_variants.items()]
    curve = pd.concat(curves, ignore_index=True)
    looped = d[(d.variant == base) & (d.r > 1)]
    rows = []
    for _, run in looped.iterrows():
        c = curve[(curve.n_once == run.n_once) & (curve.budget == run.budget) & (curve.seed == run.seed)]
        c = c.sort_values("k")
        if c.k.nunique() < 2:
            continue
        k_unique = total_blocks / int(run.r)
        k_eq = _blocks_at(float(run.loss), c.k.to_numpy(float), c.loss.to_numpy(float))
        rows.append({"run": run.run, "r": int(run.r), "n_once": int(run.n_once), "budget": float(run.budget),
                     "seed": run.seed, "k_unique": k_unique, "k_eq": k_eq,
                     "exponent": math.log(k_eq / k_unique) / math.log(run.r) if k_eq > 0 else float("nan")})
    by_r = {}
    for r, g in pd.DataFrame(rows).groupby("r") if rows else ():
        e = g.exponent.dropna()
        by_r[int(r)] = {"n": int(len(g)), "median_k_eq": float(g.k_eq.median()),
                        "median_exponent": float(e.median()) if len(e) else None,
                        "iqr_exponent": [float(e.quantile(0.25)), float(e.quantile(0.75))] if len(e) else None}
    return {"total_blocks": total_blocks, "by_r": by_r, "rows": rows,
            "note": "compute-matched: the r = 1 models with fewer blocks train on more tokens at each budget"}


def markdown(contrasts: list[dict], depth: dict | None) -> list[str]:
    L = []
    if contrasts:
        L += ["", "### Paired controls", ""] + [f"- {c['line']}" for c in contrasts]
        for c in contrasts:
            if c.get("by_budget"):
                L.append(f"  - {c['variant']} by budget: " + ", ".join(f"{b}: {v:+.4f}" for b, v in c["by_budget"].items()))
    if depth and depth["by_r"]:
        L += ["", "### Depth controls: a loop's worth in unique blocks at fixed width", "",
              f"Each looped baseline model against the r = 1 models of its width, budget and seed with "
              f"1 .. {depth['total_blocks']} unique recurrent blocks ({depth['note']}). k_eq: the unique blocks "
              f"at r = 1 that match its loss; exponent: log(k_eq / k_unique) / log r (1: a pass is worth a "
              f"block; 0: worth nothing).", "",
              "| r | cells | median k_eq | median exponent | IQR |", "|---|---|---|---|---|"]
        for r, v in sorted(depth["by_r"].items()):
            e = v["median_exponent"]
            iqr = v["iqr_exponent"]
            L.append(f"| {r} | {v['n']} | {v['median_k_eq']:.2f} | {'n/a' if e is None else f'{e:.2f}'} | "
                     f"{'n/a' if iqr is None else f'[{iqr[0]:.2f}, {iqr[1]:.2f}]'} |")
    return L
