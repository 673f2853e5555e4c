"""Bootstrap of the law fit: resample cells with replacement, refit all resamples in one batch.

What is resampled (`units`): a unit is a set of runs drawn together. The fit draws *cells*
(variant, n_once, n_rec, r, budget), so all seeds of a cell stay together and the seed-to-seed
scatter inside a cell enters the interval as it is (a resample never treats two seeds of one cell
as independent evidence). For a difference between variants the units are *matched groups*: the
cells of every variant at one (n_once, r, budget) are drawn jointly (a paired bootstrap), so a
cell-level disturbance that all variants share at one design point cancels in dphi.

A resample is a vector of integer run multiplicities, which the summed Huber objective takes as
weights, so B resamples x k starts are one (B*k, R) batch for the batched L-BFGS. Each resample
is warm-started from the point estimate and from the point estimate with phi moved to the far
side of its range (phi trades off against A/alpha, so a second basin along phi is the likely
miss; in tests the extra start changed no percentile, so one is enough).
"""
from __future__ import annotations

import numpy as np

from .law import N_BASE, PHI_MAX, LawData, batched_lbfgs, to_centred, to_raw


def resample_weights(n_boot: int, strata: np.ndarray, rng: np.random.Generator,
                     units: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, R) multiplicities. Units (default: every run its own unit) are resampled with
    replacement within each stratum, so every resample keeps each stratum's unit count; a run's
    weight is how often its unit was drawn (all runs of a unit share it)."""
    R = len(strata)
    units = np.arange(R) if units is None else np.asarray(units)
    w = np.zeros((n_boot, R))
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        ids, inv = np.unique(units[rows], return_inverse=True)
        draws = rng.integers(0, ids.size, size=(n_boot, ids.size))
        for b in range(n_boot):  # bincount per resample: cheap (n_boot x R)
            w[b, rows] = np.bincount(draws[b], minlength=ids.size)[inv]
    return w


def bootstrap(data: LawData, delta: float, free: np.ndarray, raw_hat: np.ndarray, n_boot: int,
              seed: int, strata: np.ndarray | None = None, phi_starts=None,
              max_iter: int = 200, chunk: int = 512,
              box: tuple[np.ndarray, np.ndarray] | None = None, units: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> np.ndarray:
    """Refit n_boot resamples; returns (n_boot, P) raw parameter vectors (best start each).
    units: runs drawn together (see resample_weights); weights: the (n_boot, R) multiplicities
    themselves (a paired bootstrap shares one draw across several fits), instead of drawing.
    With a search `box` (centred coordinates) each refit is moved into it afterwards: a resample
    that runs off towards a term of zero is reported at the region's edge, as the point fit is."""
    rng = np.random.default_rng(seed)
    strata = np.zeros(len(data.log_l), int) if strata is None else np.asarray(strata)
    w = resample_weights(n_boot, strata, rng, units) if weights is None else np.asarray(weights, float)
    n_boot = len(w)
    starts = [raw_hat]
    phis = slice(N_BASE, N_BASE + data.n_phi)
    free_phi = free[phis]
    if free_phi.any():
        if phi_starts is None:
            phi_starts = (0.8,) if np.mean(raw_hat[phis][free_phi]) < 0.5 else (0.2,)
        for p in phi_starts:  # same shared parameters, every free phi moved to p
            s = raw_hat.copy()
            s[phis][free_phi] = min(p, PHI_MAX)
            starts.append(s)
    starts_c = to_centred(np.array(starts), data)
    k = len(starts_c)
    out = np.empty((n_boot, len(raw_hat)))
    per = max(1, chunk // k)
    # chunks of ~512 rows keep the (rows, R) temporaries in cache: 4,000 resamples of the
    # 116-run table cost 7.5 s of CPU this way, 14 s in chunks of 4,000 rows
    for lo in range(0, n_boot, per):
        hi = min(n_boot, lo + per)
        wb = np.repeat(w[lo:hi], k, axis=0)
        x0 = np.tile(starts_c, (hi - lo, 1))
        x, f = batched_lbfgs(x0, data, delta, weights=wb, free=free, max_iter=max_iter)
        f = np.where(np.isfinite(f), f, np.inf).reshape(hi - lo, k)
        best = np.argmin(f, axis=1)
        xb = x.reshape(hi - lo, k, -1)[np.arange(hi - lo), best]
        if box is not None:
            xb = np.clip(xb, box[0], box[1])
        out[lo:hi] = to_raw(xb, data)
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]
