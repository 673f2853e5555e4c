"""Benchmark the scaling-law fit on the bundled 116-run example table; prints one JSON object.

Measures what `megaloop fit` does, piece by piece (fit.fit_law's own timers): the batched grid fit
(22,500 starts: the Hoffmann grid x 5 phi values), the profile likelihood of every parameter, the
hold-out refit and the bootstrap (default 4,000 resamples, the replication's count). Targets on
the 2-core CPU: fit + profile < 10 s, 4,000 resamples < 30 s. For comparison it also runs a plain
loop of scipy L-BFGS-B calls, one per start, in raw parameters with default tolerances. That loop
takes ~50 ms a start, so it runs on a random subsample of the same grid (--scipy-starts; 0 = the
whole grid) and its full time is extrapolated; the JSON says so.

--coverage N instead fits N synthetic tables drawn from the reference law (the example's grid
and noise, seeds 100..) and reports how often each 95 % profile interval covers the truth.

Usage: python benchmarks/fit.py [--table CSV] [--bootstrap 4000] [--scipy-starts 200] [--seed 0]
       python benchmarks/fit.py --coverage 60 [--noise 0.005]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from megaloop.analysis.fit import PHI_GRID, fit_law
from megaloop.analysis.law import PHI_MAX, LawData, multistart_fit, objective, start_grid, to_centred
from megaloop.analysis.table import load_table

DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "analysis" / "example_runs.csv"


def scipy_loop(data: LawData, grid: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """The naive baseline: one scipy L-BFGS-B minimisation per start, keep the best."""

    def fun(v: np.ndarray):
        f, g = objective(to_centred(v[None], data), data, delta)
        g = g[0].copy()  # gradient w.r.t. raw a, b: chain rule through the centring
        g[3] -= g[0] * data.c_n
        g[4] -= g[1] * data.c_d
        return float(f[0]), g

    best, best_x = np.inf, grid[0]
    bounds = [(None, None)] * 5 + [(0.0, PHI_MAX)]
    for x0 in grid:
        with np.errstate(all="ignore"):
            r = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds)
        if np.isfinite(r.fun) and r.fun < best:
            best, best_x = float(r.fun), r.x
    return best, best_x


def coverage(n: int, noise: float, delta: float) -> dict:
    """How often the 95 % profile intervals cover the generating parameters."""
    from megaloop.analysis.make_example import REFERENCE, synthetic_table

    hits = {k: 0 for k in REFERENCE}
    widths = []
    t0 = time.perf_counter()
    for seed in range(100, 100 + n):
        d = fit_law(synthetic_table(seed, noise), delta, n_boot=0, holdout=False).to_dict()
        for k, v in REFERENCE.items():
            lo, hi = d["profile_ci"][k]
            hits[k] += lo <= v <= hi
        widths.append(d["profile_ci"]["phi"][1] - d["profile_ci"]["phi"][0])
    return {"coverage_tables": n, "noise": noise, "level": 0.95,
            "covered": hits, "coverage": {k: v / n for k, v in hits.items()},
            "phi_interval_width_mean": float(np.mean(widths)), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default=str(DEFAULT_TABLE))
    ap.add_argument("--bootstrap", type=int, default=4000)
    ap.add_argument("--scipy-starts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta", type=float, default=1e-3)
    ap.add_argument("--coverage", type=int, default=0, metavar="N")
    ap.add_argument("--noise", type=float, default=0.005)
    args = ap.parse_args()
    if args.coverage:
        print(json.dumps(coverage(args.coverage, args.noise, args.delta), indent=1))
        return

    df = load_table([args.table])
    data = LawData.build(df.n_once, df.n_rec, df.r, df.tokens, df.loss)
    grid = start_grid(1, PHI_GRID)
    free = np.ones(6, bool)
    multistart_fit(data, args.delta, free, grid[:64])  # warm-up (imports, allocator)

    c0 = time.process_time()
    fit = fit_law(df, args.delta, n_boot=args.bootstrap, seed=args.seed)
    cpu = time.process_time() - c0
    sec = fit.seconds
    raw, f_batched, boot = fit.raw, fit.objective, fit.boot
    d = fit.to_dict()

    n = len(grid) if args.scipy_starts <= 0 else min(args.scipy_starts, len(grid))
    sub = np.random.default_rng(args.seed).choice(len(grid), n, replace=False)
    t0, c0 = time.perf_counter(), time.process_time()
    f_scipy, x_scipy = scipy_loop(data, grid[sub], args.delta)
    sp_wall, sp_cpu = time.perf_counter() - t0, time.process_time() - c0

    print(json.dumps({
        "table": str(args.table), "n_runs": int(len(df)), "grid_starts": int(len(grid)),
        "fit_seconds": round(sec["fit"], 3), "profile_seconds": round(sec["profile"], 3),
        "fit_plus_profile_seconds": round(sec["fit"] + sec["profile"], 3),
        "fit_plus_profile_target_seconds": 10,
        "holdout_seconds": round(sec["holdout"], 3),
        "bootstrap_resamples": args.bootstrap, "bootstrap_seconds": round(sec.get("bootstrap", 0.0), 3),
        "bootstrap_target_seconds": 30 if args.bootstrap == 4000 else None,
        "cpu_seconds_all": round(cpu, 3),
        "objective_batched": f_batched, "phi_batched": float(raw[5]),
        "phi_ci_bootstrap": d["phi_ci"], "phi_ci_profile": d["profile_ci"]["phi"],
        "holdout_rmse_log": d["holdout"]["rmse_log"],
        "scipy_loop_starts": int(n), "scipy_loop_subsampled": bool(n < len(grid)),
        "scipy_loop_seconds": round(sp_wall, 3), "scipy_loop_cpu_seconds": round(sp_cpu, 3),
        "scipy_loop_seconds_full_grid_extrapolated": round(sp_wall * len(grid) / n, 1),
        "objective_scipy_loop": f_scipy, "phi_scipy_loop": float(x_scipy[5]),
        "batched_no_worse": bool(f_batched <= f_scipy * (1 + 1e-9)),
        "objective_rel_diff": (f_batched - f_scipy) / f_scipy,
    }, indent=1))


if __name__ == "__main__":
    main()
