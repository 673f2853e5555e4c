"""Fitting the looped law to a validated table: point estimate, bootstrap, variants, joint fit.

`analyse(df, ...)` is what `megaloop fit` runs; it returns a JSON-ready report plus the fit
objects the plots need.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import bootstrap, percentile_ci
from .isoflop import isoflop
from .law import N_BASE, LawData, multistart_fit, predict_log_loss, start_grid
from .table import FitInputError

PHI_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# where phi cannot be identified it is pinned here, which makes N_eff = n_once + r * n_rec
# (the compute-equivalent size); for r = 1 or n_rec = 0 the value is irrelevant.
PINNED_PHI = 1.0
# a run is "diverged" when its loss sits this far above the fit (log-loss residual)
DIVERGED_SIGMAS, DIVERGED_FLOOR, DIVERGED_CAP = 5.0, 0.02, 0.1


def phi_identifiability(df: pd.DataFrame) -> tuple[bool, str]:
    """phi is identified only if some runs loop (r > 1 with n_rec > 0) AND the runs span at least
    two distinct (r, N_rec share) structures; with a single structure r**phi is a constant
    factor on a fixed share of N and trades off exactly against A."""
    looped = (df["r"] > 1) & (df["n_rec"] > 0)
    if not looped.any():
        return False, ("phi is not identifiable: every run has r = 1 or n_rec = 0, so the law "
                       "reduces to Chinchilla's; the other parameters are fitted with N = n_once + n_rec")
    share = (df["n_rec"] / (df["n_once"] + df["n_rec"])).round(2)
    keys = set(zip(np.where(looped, df["r"], 1.0), np.where(looped, share, 0.0)))
    if len(keys) < 2:
        return False, (f"phi is not identifiable: all runs share one recurrence structure, so r**phi "
                       f"is confounded with A; phi pinned at {PINNED_PHI:g} for the other parameters")
    return True, ""


@dataclass
class LawFit:
    """One fit of the law (single phi, or one phi per variant when joint)."""

    raw: np.ndarray                 # a, b, e, alpha, beta, phi_1..phi_K
    phi_names: list[str]
    identifiable: list[bool]
    objective: float
    df: pd.DataFrame                # runs used, with pred/resid columns
    boot: np.ndarray | None = None  # (n_boot, P) raw vectors
    diverged: list[dict] = field(default_factory=list)
    message: str = ""
    seconds_fit: float = 0.0
    seconds_bootstrap: float = 0.0
    delta: float = 1e-3

    def params(self) -> dict[str, float]:
        a, b, e, alpha, beta = self.raw[:N_BASE]
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(alpha),
                "B": float(np.exp(b)), "beta": float(beta)}

    def phi(self, k: int = 0) -> float | None:
        return float(self.raw[N_BASE + k]) if self.identifiable[k] else None

    def law_params(self, k: int = 0) -> dict[str, float]:
        """Parameters for evaluating the law (phi pinned where unidentified)."""
        return {**self.params(), "phi": float(self.raw[N_BASE + k])}

    def samples(self) -> dict[str, np.ndarray]:
        if self.boot is None:
            return {}
        b = self.boot
        out = {"E": np.exp(b[:, 2]), "A": np.exp(b[:, 0]), "alpha": b[:, 3], "B": np.exp(b[:, 1]),
               "beta": b[:, 4]}
        for k, name in enumerate(self.phi_names):
            out[f"phi:{name}"] = b[:, N_BASE + k]
        return out

    def to_dict(self, k: int = 0) -> dict[str, Any]:
        """The JSON contract: phi, phi_ci, E, E_ci, ..., n_runs, huber_delta, objective, r2, rmse_log."""
        s = self.samples()
        out: dict[str, Any] = {"phi": self.phi(k)}
        out["phi_ci"] = (percentile_ci(s[f"phi:{self.phi_names[k]}"])
                         if s and self.identifiable[k] else None)
        for name, v in self.params().items():
            out[name] = v
            out[f"{name}_ci"] = percentile_ci(s[name]) if s else None
        y = self.df["loss"].to_numpy()
        pred = np.exp(self.df["pred_log_loss"].to_numpy())
        res = np.log(y) - self.df["pred_log_loss"].to_numpy()
        out.update({
            "n_runs": int(len(self.df)), "huber_delta": self.delta, "objective": self.objective,
            "r2": float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)),
            "rmse_log": float(np.sqrt(np.mean(res ** 2))),
            "n_bootstrap": 0 if self.boot is None else int(len(self.boot)),
            "diverged": self.diverged,
            "seconds": {"fit": round(self.seconds_fit, 3), "bootstrap": round(self.seconds_bootstrap, 3)},
        })
        if not self.identifiable[k]:
            out["phi_message"] = self.message
        return out


def _law_data(df: pd.DataFrame, phi_index: np.ndarray, n_phi: int) -> LawData:
    return LawData.build(df.n_once, df.n_rec, df.r, df.tokens, df.loss, phi_index, n_phi)


def _fit_point(df: pd.DataFrame, phi_index: np.ndarray, names: list[str], ident: list[bool],
               delta: float, extra_starts: np.ndarray | None = None,
               warm: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Grid-started fit; with `warm` (a previous estimate on nearly the same runs) only that
    point and its phi-grid variants are used as starts."""
    K = len(names)
    data = _law_data(df, phi_index, K)
    free = np.array([True] * N_BASE + ident)
    fixed = np.array([np.nan if i else PINNED_PHI for i in ident])
    if warm is None:
        grid = start_grid(K, PHI_GRID, fixed_phi=fixed)
        return multistart_fit(data, delta, free, grid, extra_starts=extra_starts)
    starts = np.repeat(warm[None], len(PHI_GRID) + 1, axis=0)
    for i, p in enumerate(PHI_GRID):
        starts[i + 1, N_BASE:][np.array(ident)] = p
    return multistart_fit(data, delta, free, starts, schedule=((200, 4), (1000, 4)))


def _residuals(df: pd.DataFrame, raw: np.ndarray, phi_index: np.ndarray, K: int) -> np.ndarray:
    pred = predict_log_loss(raw, _law_data(df, phi_index, K))
    return pred


def fit_law(df: pd.DataFrame, delta: float = 1e-3, n_boot: int = 1000, seed: int = 0,
            joint: bool = False, keep_diverged: bool = False,
            extra_starts: np.ndarray | None = None) -> LawFit:
    """Fit one law to df. joint=True gives each variant its own phi with shared E, A, alpha, B, beta."""
    df = df.reset_index(drop=True)
    if joint:
        names = list(pd.unique(df["variant"]))
        phi_index = pd.Categorical(df["variant"], categories=names).codes.astype(int)
        idents = [phi_identifiability(df[df["variant"] == v]) for v in names]
    else:
        names, phi_index = ["all"], np.zeros(len(df), int)
        idents = [phi_identifiability(df)]
    ident = [i for i, _ in idents]
    n_free = N_BASE + sum(ident)
    if len(df) <= n_free:
        what = f"variant {df['variant'].iloc[0]!r}" if "variant" in df.columns and not joint else "the table"
        raise FitInputError(f"{what} has {len(df)} runs; fitting {n_free} parameters needs at least {n_free + 1}")
    message = "; ".join(f"{n}: {m}" if joint else m for n, (i, m) in zip(names, idents) if not i)
    t0 = time.perf_counter()
    raw, obj = _fit_point(df, phi_index, names, ident, delta, extra_starts)
    pred = _residuals(df, raw, phi_index, len(names))
    res = np.log(df["loss"].to_numpy()) - pred
    sigma = 1.4826 * np.median(np.abs(res - np.median(res)))
    thresh = min(DIVERGED_CAP, max(DIVERGED_SIGMAS * sigma, DIVERGED_FLOOR))
    bad = res > thresh
    diverged = [{"run": str(df["run"].iloc[i]), "loss": float(df["loss"].iloc[i]),
                 "predicted": float(np.exp(pred[i])), "log_residual": float(res[i]),
                 "dropped": not keep_diverged} for i in np.flatnonzero(bad)]
    if bad.any() and not keep_diverged and (~bad).sum() >= 8:
        # refit without them: a diverged run is a failed experiment, not a point on the law
        df, phi_index = df[~bad].reset_index(drop=True), phi_index[~bad]
        raw, obj = _fit_point(df, phi_index, names, ident, delta, warm=raw)
        pred = _residuals(df, raw, phi_index, len(names))
    elif bad.any():
        for d in diverged:
            d["dropped"] = False
    seconds_fit = time.perf_counter() - t0
    df = df.assign(pred_log_loss=pred, log_residual=np.log(df["loss"].to_numpy()) - pred)
    fit = LawFit(raw, names, ident, obj, df, diverged=diverged, message=message,
                 seconds_fit=seconds_fit, delta=delta)
    if n_boot > 0:
        t1 = time.perf_counter()
        data = _law_data(df, phi_index, len(names))
        free = np.array([True] * N_BASE + ident)
        strata = phi_index if joint else None
        fit.boot = bootstrap(data, delta, free, raw, n_boot, seed, strata=strata)
        fit.seconds_bootstrap = time.perf_counter() - t1
    return fit


def _baseline(variants: list[str]) -> str:
    return "baseline" if "baseline" in variants else variants[0]


def analyse(df: pd.DataFrame, delta: float = 1e-3, n_boot: int = 1000, seed: int = 0,
            joint: bool = False, keep_diverged: bool = False) -> tuple[dict[str, Any], dict[str, LawFit]]:
    """The whole `megaloop fit` report. Without a variant column (or with one variant) the top
    level is the fit of all runs; with several variants the top level is the baseline's fit
    (variant 'baseline', else the first) and `variants` holds every variant's fit plus its phi
    difference to the baseline with a bootstrap interval."""
    fits: dict[str, LawFit] = {}
    variants = list(pd.unique(df["variant"])) if "variant" in df.columns else []
    if len(variants) <= 1:
        fits["all"] = fit_law(df, delta, n_boot, seed, keep_diverged=keep_diverged)
        report = fits["all"].to_dict()
    else:
        base = _baseline(variants)
        per: dict[str, Any] = {}
        for v in variants:
            fits[v] = fit_law(df[df["variant"] == v], delta, n_boot, seed, keep_diverged=keep_diverged)
            per[v] = fits[v].to_dict()
        for v in variants:
            fb, fv = fits[base], fits[v]
            ok = fb.identifiable[0] and fv.identifiable[0]
            per[v]["dphi"] = float(fv.raw[N_BASE] - fb.raw[N_BASE]) if ok else None
            # independent data, independent resamples: the difference of draws is a draw of dphi
            per[v]["dphi_ci"] = (percentile_ci(fv.boot[:, N_BASE] - fb.boot[:, N_BASE])
                                 if ok and fv.boot is not None and fb.boot is not None else None)
        report = dict(per[base])
        report["fit_of"] = f"variant {base!r} (baseline)"
        report["baseline"] = base
        report["variants"] = per
        if joint:
            starts = np.array([np.concatenate([fits[base].raw[:N_BASE],
                                               [fits[v].raw[N_BASE] for v in variants]])])
            jf = fit_law(df, delta, n_boot, seed, joint=True, keep_diverged=keep_diverged,
                         extra_starts=starts)
            fits["joint"] = jf
            j = jf.to_dict(0)
            for key in ("phi", "phi_ci", "phi_message"):
                j.pop(key, None)
            j["phi"] = {v: jf.phi(k) for k, v in enumerate(jf.phi_names)}
            s = jf.samples()
            j["phi_ci"] = {v: (percentile_ci(s[f"phi:{v}"]) if s and jf.identifiable[k] else None)
                           for k, v in enumerate(jf.phi_names)}
            kb = jf.phi_names.index(base)
            j["dphi"], j["dphi_ci"] = {}, {}
            for k, v in enumerate(jf.phi_names):
                ok = jf.identifiable[k] and jf.identifiable[kb]
                j["dphi"][v] = float(jf.raw[N_BASE + k] - jf.raw[N_BASE + kb]) if ok else None
                j["dphi_ci"][v] = (percentile_ci(s[f"phi:{v}"] - s[f"phi:{base}"])
                                   if ok and s else None)
            if jf.message:
                j["phi_message"] = jf.message
            report["joint"] = j
    report["isoflop"] = isoflop(df, seed=seed)
    return report, fits


def json_safe(obj: Any) -> Any:
    """Report -> strict JSON: numpy scalars to Python, non-finite floats to null."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


def _fmt_ci(v: float | None, ci: list[float] | None, fmt: str) -> str:
    if v is None:
        return "not identifiable"
    return format(v, fmt) + ("" if ci is None else f"  [{format(ci[0], fmt)}, {format(ci[1], fmt)}]")


def format_fit(d: dict[str, Any], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"  phi   = {_fmt_ci(d['phi'], d['phi_ci'], '.4f')}")
    if d.get("phi_message"):
        lines.append(f"          ({d['phi_message']})")
    for name, fmt in (("E", ".4f"), ("A", ".4g"), ("alpha", ".4f"), ("B", ".4g"), ("beta", ".4f")):
        lines.append(f"  {name:<5} = {_fmt_ci(d[name], d[name + '_ci'], fmt)}")
    lines.append(f"  n_runs={d['n_runs']}  objective={d['objective']:.6g} (Huber delta {d['huber_delta']:g}, "
                 f"summed)  R^2(loss)={d['r2']:.4f}  RMSE(log loss)={d['rmse_log']:.4g}"
                 f"  bootstrap={d['n_bootstrap']}")
    for dv in d.get("diverged", []):
        lines.append(f"  DIVERGED run {dv['run']}: loss {dv['loss']:.4g} vs fit {dv['predicted']:.4g} "
                     f"(log residual {dv['log_residual']:+.3f}){', dropped' if dv['dropped'] else ', kept'}")
    return "\n".join(lines)


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable report (intervals are 95 % bootstrap percentiles)."""
    from .isoflop import format_isoflop
    out = []
    if "variants" in rep:
        for v, d in rep["variants"].items():
            out.append(format_fit(d, f"variant {v}{' (baseline)' if v == rep['baseline'] else ''}:"))
            if v != rep["baseline"]:
                dp = "n/a" if d["dphi"] is None else _fmt_ci(d["dphi"], d["dphi_ci"], "+.4f")
                out.append(f"  dphi vs {rep['baseline']} = {dp}")
        if "joint" in rep:
            j = rep["joint"]
            out.append("joint fit (shared E, A, alpha, B, beta; one phi per variant):")
            for v in j["phi"]:
                out.append(f"  phi[{v}] = {_fmt_ci(j['phi'][v], j['phi_ci'][v], '.4f')}"
                           + ("" if v == rep["baseline"] or j["dphi"][v] is None else
                              f"   dphi = {_fmt_ci(j['dphi'][v], j['dphi_ci'][v], '+.4f')}"))
            for name, fmt in (("E", ".4f"), ("A", ".4g"), ("alpha", ".4f"), ("B", ".4g"), ("beta", ".4f")):
                out.append(f"  {name:<5} = {_fmt_ci(j[name], j[name + '_ci'], fmt)}")
            out.append(f"  n_runs={j['n_runs']}  objective={j['objective']:.6g}  R^2={j['r2']:.4f}  "
                       f"RMSE(log loss)={j['rmse_log']:.4g}")
    else:
        out.append(format_fit(rep, "scaling law  L = E + A (N_once + r^phi N_rec)^-alpha + B D^-beta:"))
    out.append(format_isoflop(rep["isoflop"]))
    return "\n".join(out)
