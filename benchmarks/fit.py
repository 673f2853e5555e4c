"""Benchmark the scaling-law fit on the bundled 116-run example table; prints one JSON object.

Measures the batched grid fit (22,500 starts: the Hoffmann grid x 5 phi values), the bootstrap
(default 1,000 resamples) and, for comparison, a plain loop of scipy L-BFGS-B calls, one per
start, in raw parameters with default tolerances. That loop takes ~50 ms a start here, so it
runs on a random subsample of the same grid (--scipy-starts; 0 = the whole grid) and its full
time is extrapolated; the JSON says so.

Usage: python benchmarks/fit.py [--table CSV] [--bootstrap 1000] [--scipy-starts 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from megaloop.analysis.bootstrap import bootstrap, percentile_ci
from megaloop.analysis.fit import PHI_GRID
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", default=str(DEFAULT_TABLE))
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--scipy-starts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta", type=float, default=1e-3)
    args = ap.parse_args()

    df = load_table([args.table])
    data = LawData.build(df.n_once, df.n_rec, df.r, df.tokens, df.loss)
    grid = start_grid(1, PHI_GRID)
    free = np.ones(6, bool)
    multistart_fit(data, args.delta, free, grid[:64])  # warm-up (imports, allocator)

    t0, c0 = time.perf_counter(), time.process_time()
    raw, f_batched = multistart_fit(data, args.delta, free, grid)
    fit_wall, fit_cpu = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    boot = bootstrap(data, args.delta, free, raw, args.bootstrap, args.seed)
    boot_wall, boot_cpu = time.perf_counter() - t0, time.process_time() - c0

    n = len(grid) if args.scipy_starts <= 0 else min(args.scipy_starts, len(grid))
    sub = np.random.default_rng(args.seed).choice(len(grid), n, replace=False)
    t0, c0 = time.perf_counter(), time.process_time()
    f_scipy, x_scipy = scipy_loop(data, grid[sub], args.delta)
    sp_wall, sp_cpu = time.perf_counter() - t0, time.process_time() - c0

    print(json.dumps({
        "table": str(args.table), "n_runs": int(len(df)), "grid_starts": int(len(grid)),
        "fit_seconds": round(fit_wall, 3), "fit_cpu_seconds": round(fit_cpu, 3),
        "bootstrap_resamples": args.bootstrap, "bootstrap_seconds": round(boot_wall, 3),
        "bootstrap_cpu_seconds": round(boot_cpu, 3),
        "objective_batched": f_batched, "phi_batched": float(raw[5]),
        "phi_ci_bootstrap": percentile_ci(boot[:, 5]),
        "scipy_loop_starts": int(n), "scipy_loop_subsampled": bool(n < len(grid)),
        "scipy_loop_seconds": round(sp_wall, 3), "scipy_loop_cpu_seconds": round(sp_cpu, 3),
        "scipy_loop_seconds_full_grid_extrapolated": round(sp_wall * len(grid) / n, 1),
        "objective_scipy_loop": f_scipy, "phi_scipy_loop": float(x_scipy[5]),
        "batched_no_worse": bool(f_batched <= f_scipy * (1 + 1e-9)),
        "objective_rel_diff": (f_batched - f_scipy) / f_scipy,
    }, indent=1))


if __name__ == "__main__":
    main()
