"""Fitting the looped law to a validated table: point estimate, profile likelihood, hold-out,
bootstrap, variants, joint fit.

`analyse(df, ...)` is what `megaloop fit` runs; it returns a JSON-ready report plus the fit
objects the plots need. Formatting lives in report.py.

Which runs are fitted: all of them, except those whose own record says they diverged (non-finite
steps skipped in training, or a loss above ln(vocab_size): `table.record_divergence`); those are
listed under `excluded`. Runs far from the fit are listed under `diverged` and kept, unless
drop_outliers asks for the residual rule below to drop them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import bootstrap, percentile_ci
from .isoflop import budget_column
from .law import N_BASE, LawData, multistart_fit, polish, predict_log_loss, search_box, start_grid, to_centred, to_raw
from .profile import ProfileResult, profile_fit
from .report import format_fit, format_report, json_safe  # noqa: F401  (re-exported)
from .table import FitInputError, cell_keys, match_keys, record_divergence

PHI_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
# where phi cannot be identified it is pinned here, which makes N_eff = n_once + r * n_rec
# (the compute-equivalent size); for r = 1 or n_rec = 0 the value is irrelevant.
PINNED_PHI = 1.0
# a run is "far from the fit" when its loss sits this far above it (log-loss residual)
DIVERGED_SIGMAS, DIVERGED_FLOOR, DIVERGED_CAP = 5.0, 0.02, 0.1
HOLDOUT_MIN_RUNS = 3  # the hold-out predicts at least this many runs (when the budgets allow)



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
    identifiable: list[bool]        # structurally (phi_identifiability)
    objective: float
    df: pd.DataFrame                # runs used, with pred/resid columns
    boot: np.ndarray | None = None  # (n_boot, P) raw vectors
    diverged: list[dict] = field(default_factory=list)   # far from the fit
    excluded: list[dict] = field(default_factory=list)   # diverged by their own record
    message: str = ""
    profile: ProfileResult | None = None
    holdout: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    delta: float = 1e-3
    joint: bool = False
    level_names: list[str] = field(default_factory=list)  # variants with their own level offset
    e_level: bool = False

    @property
    def n_free(self) -> int:
        """Parameters fitted (structurally pinned phis excluded)."""
        return N_BASE + sum(self.identifiable) + len(self.level_names) * (2 if self.e_level else 1)

    def level_offsets(self) -> dict[str, dict[str, float]]:
        """Per variant with its own level: log A (and log E) relative to the reference variant."""
        L, lv0 = len(self.level_names), N_BASE + len(self.phi_names)
        out = {}
        for i, v in enumerate(self.level_names):
            out[v] = {"dlogA": float(self.raw[lv0 + i])}
            if self.e_level:
                out[v]["dlogE"] = float(self.raw[lv0 + L + i])
        return out

    def pname(self, k: int) -> str:
        """The name of phi k in the diagnostics: 'phi', or 'phi[variant]' in a joint fit."""
        return f"phi[{self.phi_names[k]}]" if self.joint else "phi"

    def params(self) -> dict[str, float]:
        a, b, e, alpha, beta = self.raw[:N_BASE]
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(alpha),
                "B": float(np.exp(b)), "beta": float(beta)}

    def why_not(self, name: str, k: int = 0) -> str:
        """'' when the parameter is identified, else the reason."""
        if name.startswith("phi") and not self.identifiable[k]:
            return self.message_for(k)
        if self.profile is None or name not in self.profile.profiles:
            return ""
        return self.profile.profiles[name].reason

    def message_for(self, k: int) -> str:
        return phi_identifiability(self.df[self.df["variant"] == self.phi_names[k]]
                                   if self.joint else self.df)[1]

    def phi_identified(self, k: int = 0) -> bool:
        return not self.why_not(self.pname(k), k)

    def phi(self, k: int = 0) -> float | None:
        """phi when the data identify it, else None (never a number the data cannot support)."""
        return float(self.raw[N_BASE + k]) if self.phi_identified(k) else None

    def law_params(self, k: int = 0) -> dict[str, float]:
        """Parameters for evaluating the law (phi pinned or at its estimate where unidentified)."""
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

    def diagnostics(self) -> dict[str, Any]:
        """profile_ci, at_bound, identified (and the reasons) for every parameter."""
        names = [self.pname(k) for k in range(len(self.phi_names))] + ["E", "A", "alpha", "B", "beta"]
        prof = self.profile.profiles if self.profile is not None else {}
        out: dict[str, Any] = {
            "profile_ci": {n: (prof[n].ci if n in prof else None) for n in names},
            "profile_open": {n: list(prof[n].open) for n in names if n in prof},
            "at_bound": [n for n in names if n in prof and prof[n].at_bound],
            "bound_side": {n: prof[n].at_bound for n in names if n in prof and prof[n].at_bound},
            "search_region": {n: list(prof[n].box) for n in names if n in prof},
            "identified": {}, "not_identified_because": {}}
        for n in names:
            k = next((k for k in range(len(self.phi_names)) if self.pname(k) == n), 0)
            why = self.why_not(n, k)
            out["identified"][n] = not why
            if why:
                out["not_identified_because"][n] = why
        if self.profile is not None:
            out["profile_calibration"] = self.profile.calibration.to_dict()
        return out

    def to_dict(self, k: int = 0) -> dict[str, Any]:
        """The JSON contract: phi, phi_ci, E, E_ci, ..., n_runs, huber_delta, objective, r2, rmse_log,
        profile_ci, at_bound, identified, holdout, diverged, excluded."""
        s = self.samples()
        ident = self.phi_identified(k)
        out: dict[str, Any] = {"phi": self.phi(k), "phi_estimate": float(self.raw[N_BASE + k])}
        out["phi_ci"] = percentile_ci(s[f"phi:{self.phi_names[k]}"]) if s and ident else None
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
        })
        out.update(self.diagnostics())
        out.update({"holdout": self.holdout, "diverged": self.diverged, "excluded": self.excluded,
                    "seconds": {key: round(v, 3) for key, v in self.seconds.items()}})
        if self.level_names:
            out["level_offsets"] = self.level_offsets()
        if not ident:
            out["phi_message"] = self.why_not(self.pname(k), k)
        return out


@dataclass
class Levels:
    """The per-variant-level model's layout: which variants get an offset of log A (and of log E)."""

    index: np.ndarray | None = None   # (R,) offset of each run, -1 for the reference variant
    names: list[str] = field(default_factory=list)
    e_level: bool = False

    @property
    def n_offsets(self) -> int:
        return len(self.names) * (2 if self.e_level else 1)


def _levels(df: pd.DataFrame, reference: str | None, e_level: bool) -> Levels:
    if reference is None:
        return Levels()
    names = [v for v in pd.unique(df["variant"]) if v != reference]
    pos = {v: i for i, v in enumerate(names)}
    return Levels(np.array([pos.get(v, -1) for v in df["variant"]], int), names, e_level)


def _law_data(df: pd.DataFrame, phi_index: np.ndarray, n_phi: int, levels: Levels | None = None) -> LawData:
    lv = levels or Levels()
    return LawData.build(df.n_once, df.n_rec, df.r, df.tokens, df.loss, phi_index, n_phi,
                         lv.index, len(lv.names), lv.e_level)


def _free_mask(ident: list[bool], levels: Levels, fixed_e: float | None) -> np.ndarray:
    free = np.array([True] * N_BASE + list(ident) + [True] * levels.n_offsets)
    if fixed_e is not None:
        free[2] = False
    return free


def _fit_point(df: pd.DataFrame, phi_index: np.ndarray, names: list[str], ident: list[bool],
               delta: float, extra_starts: np.ndarray | None = None,
               warm: np.ndarray | None = None, levels: Levels | None = None,
               fixed_e: float | None = None, grid_stride: int = 1) -> tuple[np.ndarray, float]:
    """Grid-started fit inside the search region; with `warm` (a previous estimate on nearly the
    same runs) only that point and its phi-grid variants are used as starts. fixed_e pins E
    (every start carries it); grid_stride > 1 keeps every grid_stride-th start of the grid (the
    sensitivity refits, which also get the reference estimate as a start)."""
    K = len(names)
    levels = levels or Levels()
    data = _law_data(df, phi_index, K, levels)
    free = _free_mask(ident, levels, fixed_e)
    box = search_box(data, K)
    fixed = np.array([np.nan if i else PINNED_PHI for i in ident])
    phis = slice(N_BASE, N_BASE + K)

    def pin_e(x: np.ndarray) -> np.ndarray:
        if fixed_e is not None:
            x = np.array(x, float)
            x[..., 2] = np.log(fixed_e)
        return x

    if warm is None:
        grid = start_grid(K, PHI_GRID, fixed_phi=fixed, n_offsets=levels.n_offsets)[::grid_stride]
        extra = None if extra_starts is None else pin_e(extra_starts)
        return multistart_fit(data, delta, free, pin_e(grid), extra_starts=extra, box=box)
    starts = np.repeat(pin_e(warm)[None], len(PHI_GRID) + 1, axis=0)
    for i, p in enumerate(PHI_GRID):
        starts[i + 1, phis][np.array(ident, bool)] = p
    return multistart_fit(data, delta, free, starts, schedule=((200, 4), (1000, 4)), box=box)


def far_from_fit(res: np.ndarray) -> np.ndarray:
    """Runs whose loss sits far above the fit: log residual above min(0.1, max(5 robust sigmas,
    0.02)). Listed in the report; dropped only on request (drop_outliers)."""
    sigma = 1.4826 * np.median(np.abs(res - np.median(res)))
    return res > min(DIVERGED_CAP, max(DIVERGED_SIGMAS * sigma, DIVERGED_FLOOR))


def holdout_check(df: pd.DataFrame, delta: float) -> dict[str, Any]:
    """Refit without the runs of the largest budget, predict them, and report the error of the
    prediction in log loss: does the law extrapolate to the next budget? Where budgets are not
    on a grid (every run its own budget, as in the Chinchilla extraction) the next budgets down
    join until HOLDOUT_MIN_RUNS runs are held out; `min_budget` then says from where."""
    budget = budget_column(df)
    levels = np.sort(budget.unique())[::-1]
    top = float(levels[0])
    n_levels = 1
    while (budget >= levels[n_levels - 1]).sum() < HOLDOUT_MIN_RUNS and n_levels < len(levels) - 1:
        n_levels += 1
    low = float(levels[n_levels - 1])
    test = (budget >= low).to_numpy()
    out: dict[str, Any] = {"budget": top, "n_runs": int(test.sum()), "n_train": int((~test).sum()),
                           "rmse_log": None, "max_abs_log": None, "bias_log": None, "phi": None}
    if n_levels > 1:
        out["min_budget"] = low
    train = df[~test].reset_index(drop=True)
    ok, _ = phi_identifiability(train) if len(train) else (False, "")
    n_free = N_BASE + int(ok)
    if not len(train) or budget.nunique() < 2:
        out["skipped"] = "every run has the same budget: nothing to hold out"
        return out
    if len(train) <= n_free:
        out["skipped"] = (f"{len(train)} run(s) below the largest budget; fitting {n_free} parameters "
                          f"needs at least {n_free + 1}")
        return out
    raw, _ = _fit_point(train, np.zeros(len(train), int), ["all"], [ok], delta)
    held = df[test].reset_index(drop=True)
    pred = predict_log_loss(raw, _law_data(held, np.zeros(len(held), int), 1))
    res = np.log(held["loss"].to_numpy()) - pred
    out.update({"rmse_log": float(np.sqrt(np.mean(res ** 2))), "max_abs_log": float(np.max(np.abs(res))),
                "bias_log": float(np.mean(res)), "phi": float(raw[N_BASE]) if ok else None,
                "runs": [{"run": str(r), "loss": float(lv), "predicted": float(np.exp(p)), "log_residual": float(e)}
                         for r, lv, p, e in zip(held["run"], held["loss"], pred, res)]})
    return out


def fit_law(df: pd.DataFrame, delta: float = 1e-3, n_boot: int = 1000, seed: int = 0,
            joint: bool = False, drop_outliers: bool = False, extra_starts: np.ndarray | None = None,
            profile: bool = True, holdout: bool = True, level_reference: str | None = None,
            e_level: bool = False, fixed_e: float | None = None, paired: bool = False,
            boot_weights: np.ndarray | None = None, grid_stride: int = 1) -> LawFit:
    """Fit one law to df. joint=True gives each variant its own phi with shared E, A, alpha, B, beta.

    level_reference (joint only): the per-variant-level model, every variant but this one gets
    its own log A offset (and log E offset with e_level). fixed_e pins E. Bootstrap units: cells
    (all seeds of a cell drawn together); paired=True draws matched design points across
    variants jointly (table.match_keys); boot_weights (n_boot, len(df)) gives the draws instead
    (one draw shared by several fits)."""
    df = df.reset_index(drop=True)
    if "run" not in df.columns:  # tables built in code may skip validate(), which names rows so
        df = df.assign(run=[f"row{i + 1}" for i in range(len(df))])
    why = record_divergence(df)
    excluded = [{"run": str(df["run"].iloc[i]), "loss": float(df["loss"].iloc[i]), "reason": w}
                for i, w in enumerate(why) if w]
    kept = np.array([not w for w in why], bool)
    df = df[kept].reset_index(drop=True)
    if boot_weights is not None:
        boot_weights = np.asarray(boot_weights, float)[:, kept]
    if joint:
        names = list(pd.unique(df["variant"]))
        phi_index = pd.Categorical(df["variant"], categories=names).codes.astype(int)
        idents = [phi_identifiability(df[df["variant"] == v]) for v in names]
    else:
        names, phi_index = ["all"], np.zeros(len(df), int)
        idents = [phi_identifiability(df)] if len(df) else [(False, "")]
    ident = [i for i, _ in idents]
    levels = _levels(df, level_reference, e_level) if joint else Levels()
    n_free = N_BASE + sum(ident) + levels.n_offsets - (fixed_e is not None)
    if len(df) <= n_free:
        what = f"variant {df['variant'].iloc[0]!r}" if "variant" in df.columns and not joint and len(df) else "the table"
        dropped = f" after excluding {len(excluded)} diverged run(s)" if excluded else ""
        raise FitInputError(f"{what} has {len(df)} runs{dropped}; fitting {n_free} parameters needs at least {n_free + 1}")
    message = "; ".join(f"{n}: {m}" if joint else m for n, (i, m) in zip(names, idents) if not i)
    K = len(names)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if extra_starts is not None and levels.n_offsets:  # starts of the shared model: offsets at 0
        extra_starts = np.atleast_2d(extra_starts)
        if extra_starts.shape[1] == N_BASE + K:
            extra_starts = np.concatenate([extra_starts, np.zeros((len(extra_starts), levels.n_offsets))], 1)
    raw, obj = _fit_point(df, phi_index, names, ident, delta, extra_starts, levels=levels,
                          fixed_e=fixed_e, grid_stride=grid_stride)
    res = np.log(df["loss"].to_numpy()) - predict_log_loss(raw, _law_data(df, phi_index, K, levels))
    bad = far_from_fit(res)
    diverged = [{"run": str(df["run"].iloc[i]), "loss": float(df["loss"].iloc[i]),
                 "predicted": float(np.exp(np.log(df["loss"].iloc[i]) - res[i])), "log_residual": float(res[i]),
                 "dropped": False} for i in np.flatnonzero(bad)]
    if drop_outliers and bad.any() and (~bad).sum() > n_free:
        # on request: refit without them, as a failed experiment rather than a point on the law
        for d in diverged:
            d["dropped"] = True
        df, phi_index = df[~bad].reset_index(drop=True), phi_index[~bad]
        if boot_weights is not None:
            boot_weights = boot_weights[:, ~bad]
        levels = _levels(df, level_reference, e_level) if joint else Levels()
        raw, obj = _fit_point(df, phi_index, names, ident, delta, warm=raw, levels=levels, fixed_e=fixed_e)
    seconds["fit"] = time.perf_counter() - t0
    data = _law_data(df, phi_index, K, levels)
    free = _free_mask(ident, levels, fixed_e)
    box = search_box(data, K)
    fit = LawFit(raw, names, ident, obj, df, diverged=diverged, excluded=excluded, message=message,
                 delta=delta, joint=joint, level_names=levels.names, e_level=levels.e_level)
    if profile:
        t1 = time.perf_counter()
        pnames = [fit.pname(k) for k in range(K)]
        pr = profile_fit(data, delta, raw, obj, free, box, pnames)
        if pr.better is not None:  # the profile found a lower objective than the grid fit: adopt it
            x, obj = polish(to_centred(pr.better, data), data, delta, free, box=box)
            raw = to_raw(x, data)
            fit.raw, fit.objective = raw, obj
            pr = profile_fit(data, delta, raw, obj, free, box, pnames)
            pr.better = None
        fit.profile = pr
        seconds["profile"] = time.perf_counter() - t1
    pred = predict_log_loss(raw, data)
    fit.df = df.assign(pred_log_loss=pred, log_residual=np.log(df["loss"].to_numpy()) - pred)
    if holdout and not joint:
        t1 = time.perf_counter()
        fit.holdout = holdout_check(df, delta)
        seconds["holdout"] = time.perf_counter() - t1
    if n_boot > 0:
        t1 = time.perf_counter()
        if boot_weights is not None or paired:
            units, strata = match_keys(df), None
        else:  # cells within each variant: a variant keeps its cell count in every resample
            units, strata = cell_keys(df), (phi_index if joint else None)
        fit.boot = bootstrap(data, delta, free, raw, n_boot, seed, strata=strata, box=box,
                             units=units, weights=boot_weights)
        seconds["bootstrap"] = time.perf_counter() - t1
    fit.seconds = seconds
    return fit
