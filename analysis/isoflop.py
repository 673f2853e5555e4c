"""Iso-FLOP analysis: per (variant, r, compute budget), a parabola of loss in log N.

N is the compute-equivalent size n_once + r * n_rec (what a run at that budget pays for). Within
a group of >= 3 sizes, OLS fits loss = c0 + c1 x + c2 x^2 with x = log N (centred for
conditioning); the vertex gives the compute-optimal N* and L*. Intervals come from sampling the
coefficients from the OLS normal approximation (mean, covariance) and taking percentiles of
the vertex, which handles the non-linear -c1/(2 c2) better than a first-order delta method
when the curvature is weakly determined. With exactly 3 sizes the parabola passes through every
point (no residual degree of freedom): its vertex is given without an interval, computed
directly rather than by OLS, and the report says so in one line.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
import statsmodels.api as sm

# vertices further than this fraction of the sampled log-N range outside it stay out of the frontier
FRONTIER_MARGIN = 0.25


def budget_column(df: pd.DataFrame) -> pd.Series:
    """Compute budget per run, rounded to 3 significant digits (groups runs of one budget)."""
    if "flops" in df.columns:
        c = df["flops"].astype(float)
    else:  # the usual approximation when the table has no FLOPs: 6 * compute-equivalent N * D
        c = 6.0 * (df["n_once"] + df["r"] * df["n_rec"]) * df["tokens"]
    return c.map(lambda v: float(f"{v:.3g}"))


def fit_parabola(x: np.ndarray, y: np.ndarray, n_samples: int = 4000, seed: int = 0) -> dict[str, Any]:
    """OLS parabola y ~ x; vertex and its 95 % intervals. x is log N."""
    xm = float(np.mean(x))
    xc = x - xm
    X = np.column_stack([np.ones_like(xc), xc, xc * xc])
    exact = len(x) <= 3  # no residual dof: OLS has no variance to give (statsmodels divides by 0)
    if exact:
        params = np.linalg.lstsq(X, y, rcond=None)[0]
    else:
        res = sm.OLS(y, X).fit()
        params = np.asarray(res.params, float)
    c0, c1, c2 = (float(v) for v in params)
    out: dict[str, Any] = {"coef": [c0, c1, c2], "x_center": xm, "n_points": int(len(x)),
                           "N_opt": None, "L_opt": None, "N_opt_ci": None, "L_opt_ci": None,
                           "curvature_ok": c2 > 0, "extrapolated": None, "on_frontier": False}
    if exact:
        out["no_interval"] = "3 sizes: the parabola passes through every point, so its vertex has no interval"
    if c2 <= 0:
        return out  # no minimum inside: the budget's sizes do not bracket the optimum
    xs = -c1 / (2 * c2)
    out["N_opt"] = math.exp(xs + xm)
    out["L_opt"] = c0 - c1 * c1 / (4 * c2)
    out["extrapolated"] = not (xc.min() <= xs <= xc.max())
    # a vertex far outside the sampled sizes is the parabola's guess, not a measurement
    margin = FRONTIER_MARGIN * (xc.max() - xc.min())
    out["on_frontier"] = bool(xc.min() - margin <= xs <= xc.max() + margin)
    if exact:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cov = np.asarray(res.cov_params(), float)
    if res.df_resid > 0 and np.all(np.isfinite(cov)):
        rng = np.random.default_rng(seed)
        draws = rng.multivariate_normal(res.params, cov, size=n_samples)
        ok = draws[:, 2] > 0
        if ok.mean() > 0.5:
            d = draws[ok]
            xv = -d[:, 1] / (2 * d[:, 2])
            lv = d[:, 0] - d[:, 1] ** 2 / (4 * d[:, 2])
            out["N_opt_ci"] = [float(v) for v in np.exp(np.percentile(xv, [2.5, 97.5]) + xm)]
            out["L_opt_ci"] = [float(v) for v in np.percentile(lv, [2.5, 97.5])]
    return out


def isoflop(df: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """Groups, parabolas and the compute-optimal frontier per (variant, r)."""
    d = df.copy()
    d["budget"] = budget_column(d)
    d["N"] = d["n_once"] + d["r"] * d["n_rec"]
    keys = (["variant"] if "variant" in d.columns else []) + ["r", "budget"]
    groups = []
    for key, g in d.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        info = dict(zip(keys, key))
        info["r"] = float(info["r"])
        if g["N"].nunique() < 3:
            groups.append({**info, "n_points": int(len(g)), "skipped": "fewer than 3 sizes"})
            continue
        par = fit_parabola(np.log(g["N"].to_numpy()), g["loss"].to_numpy(), seed=seed)
        groups.append({**info, **par})
    frontier = []
    fkeys = keys[:-1]
    for fk in sorted({tuple(g[k] for k in fkeys) for g in groups}):
        pts = [g for g in groups if tuple(g[k] for k in fkeys) == fk and g.get("on_frontier")]
        pts.sort(key=lambda g: g["budget"])
        entry: dict[str, Any] = dict(zip(fkeys, fk))
        entry["points"] = [{"budget": g["budget"], "N_opt": g["N_opt"], "L_opt": g["L_opt"],
                            "N_opt_ci": g["N_opt_ci"], "L_opt_ci": g["L_opt_ci"]} for g in pts]
        entry["N_exponent"] = entry["N_exponent_ci"] = None
        if len(pts) >= 2:  # N* ~ C^a: the compute-optimal allocation exponent
            lc, ln = np.log([g["budget"] for g in pts]), np.log([g["N_opt"] for g in pts])
            if len(pts) == 2:  # a line through two points: no interval (and no OLS division by 0)
                entry["N_exponent"] = float((ln[1] - ln[0]) / (lc[1] - lc[0]))
            else:
                res = sm.OLS(ln, sm.add_constant(lc)).fit()
                entry["N_exponent"] = float(res.params[1])
                entry["N_exponent_ci"] = [float(v) for v in np.asarray(res.conf_int(0.05))[1]]
        frontier.append(entry)
    return {"groups": groups, "frontier": frontier}


def format_isoflop(iso: dict[str, Any]) -> str:
    lines = ["iso-FLOP frontier (compute-optimal N = n_once + r*n_rec, from parabolas in log N):"]
    for fr in iso["frontier"]:
        tag = (f"variant {fr['variant']}, " if "variant" in fr else "") + f"r={fr['r']:g}"
        exp = "" if fr["N_exponent"] is None else f"  N* ~ C^{fr['N_exponent']:.3f}"
        lines.append(f"  {tag}:{exp}")
        for p in fr["points"]:
            nci = "" if p["N_opt_ci"] is None else f" [{p['N_opt_ci'][0]:.3g}, {p['N_opt_ci'][1]:.3g}]"
            lci = "" if p["L_opt_ci"] is None else f" [{p['L_opt_ci'][0]:.4f}, {p['L_opt_ci'][1]:.4f}]"
            lines.append(f"    C={p['budget']:.3g}: N*={p['N_opt']:.3g}{nci}  L*={p['L_opt']:.4f}{lci}")
    small = [g for g in iso["groups"] if g.get("skipped")]
    flat = [g for g in iso["groups"] if not g.get("skipped") and not g.get("N_opt")]
    exact = [g for g in iso["groups"] if g.get("no_interval") and g.get("N_opt")]
    far = [g for g in iso["groups"] if g.get("N_opt") and not g.get("on_frontier")]
    if small:
        lines.append(f"  ({len(small)} group(s) with fewer than 3 sizes: too small for a parabola)")
    if exact:
        lines.append(f"  ({len(exact)} group(s) with only 3 sizes: the parabola passes through every point, "
                     "so its vertex has no interval; 4 or more sizes give one)")
    if flat:
        lines.append(f"  ({len(flat)} group(s) without a minimum: the loss does not curve up across the sizes)")
    if far:
        lines.append(f"  ({len(far)} group(s) whose vertex lies far outside the sampled sizes: left off the frontier)")
    return "\n".join(lines)
