"""The joint fit's referee checks: which level model the data prefer, seed noise, the sensitivity
table and the design's power for a phi difference.

Two joint models (fit.fit_law with joint=True):
* shared level: E, A, alpha, B, beta shared, one phi per variant (every level difference between
  variants must then be carried by phi);
* per-variant level: the same plus an offset of log A (and, with e_level, of log E) for every
  variant other than the baseline; alpha, B, beta (and E unless e_level) shared.

Model comparison. The objective is a summed Huber loss, not a log-likelihood, so the test is the
robust likelihood-ratio test of Schrader & Hettmansperger (the calibration profile.py uses for
its intervals): D = 2 k (F_shared - F_per_variant), with k = E[psi'] / E[psi^2] estimated from the
residuals of the larger (per-variant) model, is asymptotically chi-square with as many degrees of
freedom as the per-variant model adds. For squared loss this is the Gaussian LR test. Δphi is
reported under the preferred model: the per-variant one when the shared one is rejected at 5 %,
else the shared one (the smaller model, not rejected).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2

from .bootstrap import percentile_ci, resample_weights
from .law import N_BASE, PHI_MAX, batched_lbfgs, predict_log_loss, search_box, to_centred, to_raw
from .profile import calibrate
from .table import FitInputError, budget_of, cell_keys, match_keys

LEVEL_P = 0.05
SENSITIVITY_STRIDE = 9      # sensitivity refits: every 9th start of the grid + the reference estimate
SQUARED_DELTA = 1.0         # Huber delta far above every log residual: the squared loss
POWER_DPHIS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
POWER_RATE = 0.8


# ---------------------------------------------------------------------------------------------
# input checks

def check_shared_budgets(df: pd.DataFrame, base: str) -> None:
    """Levels of two variants are separable only through runs at common budgets: with none, a
    level offset and the data term cannot be told apart."""
    budgets = budget_of(df)
    ref = set(budgets[df["variant"] == base])
    alone = [v for v in pd.unique(df["variant"]) if v != base and not (set(budgets[df["variant"] == v]) & ref)]
    if alone:
        raise FitInputError(
            f"--joint: variant(s) {', '.join(map(repr, alone))} share no budget with {base!r}, so their "
            "levels cannot be separated from the budget's effect; run them at a budget of the baseline")


# ---------------------------------------------------------------------------------------------
# seed noise

def seed_noise(df: pd.DataFrame) -> dict[str, Any] | None:
    """Pooled per-run SD of log loss (and loss) inside cells with several seeds, by budget and
    overall, with its degrees of freedom (sum of n_cell - 1). None when no cell has two runs."""
    cells = cell_keys(df)
    budget = budget_of(df).to_numpy()
    log_l, loss = np.log(df["loss"].to_numpy()), df["loss"].to_numpy()
    rows = []
    for b in sorted(set(budget)):
        ss_log = ss = 0.0
        dof = n_cells = 0
        for c in np.unique(cells[budget == b]):
            m = cells == c
            if m.sum() < 2:
                continue
            ss_log += float(np.sum((log_l[m] - log_l[m].mean()) ** 2))
            ss += float(np.sum((loss[m] - loss[m].mean()) ** 2))
            dof += int(m.sum() - 1)
            n_cells += 1
        if dof:
            rows.append({"budget": float(b), "sd_log": float(np.sqrt(ss_log / dof)),
                         "sd_loss": float(np.sqrt(ss / dof)), "df": dof, "n_cells": n_cells})
    if not rows:
        return None
    dof = sum(r["df"] for r in rows)
    return {"by_budget": rows, "df": dof,
            "sd_log": float(np.sqrt(sum(r["sd_log"] ** 2 * r["df"] for r in rows) / dof)),
            "sd_loss": float(np.sqrt(sum(r["sd_loss"] ** 2 * r["df"] for r in rows) / dof)),
            "intervals": "the bootstrap draws whole cells with all their seeds, so the scatter "
                         "between seeds is inside the intervals"}


NO_SEEDS_LINE = ("one run per cell: seed noise is not measured, and the intervals do not include it "
                 "beyond the scatter of the runs around the law")


# ---------------------------------------------------------------------------------------------
# model comparison

def compare_models(shared, per_variant) -> dict[str, Any]:
    """Robust LR test of the shared-level model against the per-variant-level one (see module doc)."""
    res = per_variant.df["log_residual"].to_numpy()
    cal = calibrate(res, per_variant.delta, per_variant.n_free)
    stat = max(0.0, 2.0 * cal.k * (shared.objective - per_variant.objective))
    dof = per_variant.n_free - shared.n_free
    p = float(chi2.sf(stat, dof)) if dof > 0 else 1.0
    pref = "per_variant_level" if p < LEVEL_P else "shared_level"
    what = "A and E" if per_variant.e_level else "A"
    return {
        "models": {
            "shared_level": {"description": "E, A, alpha, B, beta shared; one phi per variant",
                             "objective": shared.objective, "n_params": shared.n_free},
            "per_variant_level": {"description": f"{what} per variant; "
                                  f"{'alpha, B, beta' if per_variant.e_level else 'E, alpha, B, beta'} "
                                  "shared; one phi per variant",
                                  "objective": per_variant.objective, "n_params": per_variant.n_free,
                                  "level_offsets": per_variant.level_offsets()}},
        "test": "robust likelihood ratio (Schrader-Hettmansperger): D = 2 k (F_shared - F_per_variant), "
                "k = E[psi']/E[psi^2] from the per-variant model's residuals, D ~ chi2(df)",
        "statistic": stat, "df": dof, "p": p, "scale_k": cal.k, "preferred": pref,
        "dphi_reported_under": pref}


# ---------------------------------------------------------------------------------------------
# Δphi of a joint fit

def phi_summary(jf, base: str) -> dict[str, Any]:
    """phi per variant and Δphi against base, with the (paired) bootstrap intervals."""
    s = jf.samples()
    kb = jf.phi_names.index(base)
    out: dict[str, Any] = {"phi": {}, "phi_ci": {}, "dphi": {}, "dphi_ci": {}}
    for k, v in enumerate(jf.phi_names):
        out["phi"][v] = jf.phi(k)
        out["phi_ci"][v] = percentile_ci(s[f"phi:{v}"]) if s and jf.phi_identified(k) else None
        ok = jf.phi_identified(k) and jf.phi_identified(kb)
        out["dphi"][v] = float(jf.raw[N_BASE + k] - jf.raw[N_BASE + kb]) if ok else None
        out["dphi_ci"][v] = percentile_ci(s[f"phi:{v}"] - s[f"phi:{base}"]) if ok and s else None
    return out


# ---------------------------------------------------------------------------------------------
# sensitivity

def _specs(df: pd.DataFrame, ref, has_adapter: bool) -> list[dict[str, Any]]:
    e_hat, l_min = ref.params()["E"], float(df["loss"].min())
    specs = [{"row": "reference", "df": df}]
    # two pinned values of E inside (0, min loss): half the estimate and halfway to the lowest loss
    for e in (0.5 * e_hat, 0.5 * (e_hat + l_min)):
        specs.append({"row": f"E fixed at {e:.3g}", "df": df, "fixed_e": e})
    for b in sorted(set(budget_of(df))):
        specs.append({"row": f"without budget {b:.3g}", "df": df[budget_of(df) != b]})
    if has_adapter:
        moved = df.assign(n_once=df["n_once"] + df["n_adapter"], n_rec=df["n_rec"] - df["n_adapter"])
        specs.append({"row": "adapter in N_once", "df": moved})
    specs.append({"row": "squared loss", "df": df, "delta": SQUARED_DELTA})
    return specs


def sensitivity(df: pd.DataFrame, ref, base: str, delta: float, level_reference: str | None,
                e_level: bool) -> dict[str, Any]:
    """phi (baseline) and each Δphi under alternative specifications of the preferred model;
    point estimates from grid-started refits with every SENSITIVITY_STRIDE-th start plus the
    reference estimate (no bootstrap, no profile)."""
    from .fit import fit_law

    has_adapter = "n_adapter" in df.columns and df["n_adapter"].notna().all()
    convention = ("in N_rec (as in the table)" if has_adapter else
                  "as in the table (no n_adapter column: the adapter-in-N_once row is not available)")
    rows = []
    for spec in _specs(df, ref, has_adapter):
        sub = spec["df"].reset_index(drop=True)
        row: dict[str, Any] = {"row": spec["row"], "n_runs": int(len(sub))}
        variants = [v for v in pd.unique(sub["variant"])]
        if base not in variants:
            row["skipped"] = f"no {base} runs left"
            rows.append(row)
            continue
        lref = level_reference if (level_reference in variants and len(variants) > 1) else None
        try:
            if spec["row"] == "reference":
                f = ref
            else:
                start = ref.raw if list(pd.unique(sub["variant"])) == ref.phi_names else None
                f = fit_law(sub, spec.get("delta", delta), n_boot=0, joint=True, profile=False, holdout=False,
                            level_reference=lref, e_level=e_level, fixed_e=spec.get("fixed_e"),
                            extra_starts=start, grid_stride=SENSITIVITY_STRIDE)
        except FitInputError as exc:
            row["skipped"] = str(exc)
            rows.append(row)
            continue
        kb = f.phi_names.index(base)
        row["phi"] = float(f.raw[N_BASE + kb]) if f.identifiable[kb] else None
        row["dphi"] = {v: (float(f.raw[N_BASE + k] - f.raw[N_BASE + kb])
                           if f.identifiable[k] and f.identifiable[kb] else None)
                       for k, v in enumerate(f.phi_names) if v != base}
        row["E"] = f.params()["E"]
        rows.append(row)
    return {"rows": rows, "adapter_convention": convention,
            "refits": f"every {SENSITIVITY_STRIDE}th start of the grid plus the reference estimate; "
                      "point estimates only",
            "conclusions": conclusions(rows, phi_summary(ref, base) if ref.boot is not None else None,
                                       base, [v for v in ref.phi_names if v != base])}


def conclusions(rows: list[dict], summ: dict | None, base: str, probes: list[str]) -> list[dict[str, Any]]:
    """The reference fit's conclusions (phi < 1 or > 1 when its interval excludes 1; the sign of
    each Δphi when its interval excludes 0) and whether every sensitivity row agrees in sign.
    summ: phi_summary of the reference fit (None: no bootstrap, so no conclusion is drawn)."""
    out = []

    def verdict(name, values, ref_ci, threshold, what):
        vals = [v for v in values if v is not None]
        if ref_ci is None:
            claim, side = f"{what}: not identified (or no bootstrap) in the reference fit, no conclusion", None
        elif ref_ci[1] < threshold:
            claim, side = f"{name} < {threshold:g}", -1
        elif ref_ci[0] > threshold:
            claim, side = f"{name} > {threshold:g}", 1
        else:
            claim, side = f"{name} not distinguishable from {threshold:g} (interval covers it)", 0
        if side in (-1, 1):
            ok = bool(vals) and all(np.sign(v - threshold) == side for v in vals)
            n_na = len(values) - len(vals)
            line = (f"{claim}: {'survives every row' if ok else 'does NOT survive every row'}"
                    + (f" ({n_na} row(s) cannot estimate it)" if n_na else ""))
        else:
            above = sum(v > threshold for v in vals)
            ok = None
            line = f"{claim}: {above} of {len(vals)} rows above {threshold:g}, {len(vals) - above} below"
        out.append({"conclusion": claim, "survives": ok, "line": line})

    verdict(f"phi[{base}]", [r.get("phi") for r in rows], summ["phi_ci"][base] if summ else None, 1.0,
            f"phi[{base}]")
    for v in probes:
        verdict(f"dphi[{v}]", [(r.get("dphi") or {}).get(v) for r in rows],
                summ["dphi_ci"][v] if summ else None, 0.0, f"dphi[{v}]")
    return out


# ---------------------------------------------------------------------------------------------
# power

def _quick_refit(data, delta: float, free: np.ndarray, box, truth: np.ndarray) -> np.ndarray:
    """A simulated table's refit: batched L-BFGS from the truth and from the truth with every
    phi at the other end of the usual range (phi's second basin), inside the search box."""
    starts = np.repeat(truth[None], 2, axis=0)
    phis = slice(N_BASE, N_BASE + data.n_phi)
    starts[1, phis] = np.where(free[phis], np.where(truth[phis] < 0.5, 0.8, 0.2), truth[phis])
    x0 = to_centred(starts, data)
    x, f = batched_lbfgs(x0, data, delta, free=free, lo=box[0], hi=box[1], max_iter=400)
    return to_raw(x[int(np.argmin(np.where(np.isfinite(f), f, np.inf)))], data)


def power(fit, base: str, noise: dict | None, n_sims: int = 20, dphis=POWER_DPHIS, seed: int = 0) -> dict[str, Any]:
    """Smallest Δphi the design would detect, by simulation: tables with the fitted table's runs
    (its cells and seeds), log loss = the fitted law (every probe's phi moved by Δphi) + Gaussian
    noise at the measured per-run SD of its budget (the pooled seed SD; without seeds the fit's
    RMS log residual, which also holds any misfit: conservative). Each table is refitted (the
    same model, batched L-BFGS in the search box from the truth and from phi's other basin: a
    cheaper refit than the grid-started one, stated in the report). Each probe's phi is moved
    away from the nearer end of [0, PHI_MAX] and the test is one-sided in that direction at
    2.5 %, i.e. the two-sided 5 % test. Detected: the refitted Δphi lies beyond
    the null simulations' (Δphi = 0) mean + 1.96 SD, a two-sided 5 % test. The minimum detectable
    Δphi is where the detection rate first reaches 80 % (linear interpolation on the grid)."""
    from .fit import _free_mask, _law_data, _levels

    t0 = time.perf_counter()
    df = fit.df
    K = len(fit.phi_names)
    kb = fit.phi_names.index(base)
    probes = [k for k in range(K) if k != kb and fit.identifiable[k] and fit.identifiable[kb]]
    if not probes:
        return {"skipped": "no probe with an identified phi"}
    phi_index = pd.Categorical(df["variant"], categories=fit.phi_names).codes.astype(int)
    levels = _levels(df, base, fit.e_level) if fit.level_names else None
    data = _law_data(df, phi_index, K, levels)
    free = _free_mask(fit.identifiable, levels or _levels(df, None, False), None)
    box = search_box(data, K)
    budget = budget_of(df).to_numpy()
    if noise:
        by = {r["budget"]: r["sd_log"] for r in noise["by_budget"]}
        sd = np.array([by.get(b, noise["sd_log"]) for b in budget])
        source = "pooled seed SD of log loss by budget"
    else:
        sd = np.full(len(df), float(np.sqrt(np.mean(df["log_residual"].to_numpy() ** 2))))
        source = "the fit's RMS log residual (no seeds: includes misfit, conservative)"
    # each probe's phi moves away from the nearer end of [0, PHI_MAX], so the grid stays inside it
    sign = {k: (-1.0 if fit.raw[N_BASE + k] > PHI_MAX / 2 else 1.0) for k in probes}
    rng = np.random.default_rng(seed)
    est = {k: np.empty((len(dphis), n_sims)) for k in probes}
    for i, dp in enumerate(dphis):
        truth = fit.raw.copy()
        for k in probes:
            truth[N_BASE + k] = np.clip(truth[N_BASE + k] + sign[k] * dp, 0, PHI_MAX)
        mean = predict_log_loss(truth, data)
        for s in range(n_sims):
            data.log_l = mean + rng.normal(0.0, sd)
            raw = _quick_refit(data, fit.delta, free, box, truth)
            for k in probes:
                est[k][i, s] = sign[k] * (raw[N_BASE + k] - raw[N_BASE + kb])
    out: dict[str, Any] = {"n_sims": n_sims, "dphi_grid": list(dphis), "noise": source,
                           "refit": "batched L-BFGS from the truth and from phi's other basin",
                           "criterion": "refitted dphi beyond the null mean + 1.96 null SD, in the direction of the "
                                        "shift (two-sided 5 %); "
                                        f"minimum detectable dphi where detection reaches {POWER_RATE:.0%}",
                           "variants": {}}
    for k in probes:
        e = est[k]
        null_mean, null_sd = float(e[0].mean()), float(e[0].std(ddof=1))
        thr = 1.96 * null_sd
        shift = np.asarray(dphis, float) - dphis[0]
        raw_rate = (e - null_mean > thr).mean(axis=1)
        rate = np.maximum.accumulate(raw_rate)  # where the rate first reaches the target
        hit = np.flatnonzero(rate >= POWER_RATE)
        mdd = None
        if hit.size:
            j = int(hit[0])
            mdd = float(shift[0]) if j == 0 else float(np.interp(POWER_RATE, [rate[j - 1], rate[j]], shift[j - 1:j + 1]))
        out["variants"][fit.phi_names[k]] = {
            "detection_rate": [float(x) for x in raw_rate], "null_sd": null_sd, "threshold": thr,
            "min_detectable_dphi": mdd,
            "line": (f"minimum detectable dphi {mdd:.3f}" if mdd is not None else
                     f"not detected at {POWER_RATE:.0%} up to dphi = {max(dphis):g}")}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ---------------------------------------------------------------------------------------------
# the joint section of the report

def joint_report(df: pd.DataFrame, fits: dict, variants: list[str], base: str, delta: float, n_boot: int,
                 seed: int, drop_outliers: bool, e_level: bool = False, power_sims: int = 20,
                 with_sensitivity: bool = True) -> dict[str, Any]:
    from .fit import fit_law

    check_shared_budgets(df, base)
    starts = np.array([np.concatenate([fits[base].raw[:N_BASE], [fits[v].raw[N_BASE] for v in variants]])])
    shared = fit_law(df, delta, n_boot, seed, joint=True, drop_outliers=drop_outliers, extra_starts=starts,
                     paired=True)
    # the per-variant model on exactly the runs the shared one kept, so the two objectives compare
    kept = shared.df.drop(columns=["pred_log_loss", "log_residual"])
    per = fit_law(kept, delta, n_boot, seed, joint=True, extra_starts=shared.raw, paired=True,
                  level_reference=base, e_level=e_level)
    comp = compare_models(shared, per)
    pref = per if comp["preferred"] == "per_variant_level" else shared
    fits["joint"] = pref  # what the plots draw: the joint fit dphi is reported under
    j = pref.to_dict(0)
    for key in ("phi", "phi_ci", "phi_message", "phi_estimate"):
        j.pop(key, None)
    j.update(phi_summary(pref, base))
    j["phi_estimate"] = {v: float(pref.raw[N_BASE + k]) for k, v in enumerate(pref.phi_names)}
    j["model"] = comp["preferred"]
    j["model_comparison"] = comp
    j["bootstrap_units"] = ("matched design points (n_once, r, budget): the cells of every variant there, "
                            "with all their seeds, drawn together (paired)")
    other = shared if pref is per else per
    comp["models"]["shared_level"].update(phi_summary(shared, base))
    comp["models"]["per_variant_level"].update(phi_summary(per, base))
    comp["models"]["per_variant_level" if other is per else "shared_level"]["note"] = (
        "not the preferred model" + (": rejected at 5 %" if other is shared else ""))
    msgs = {v: pref.why_not(pref.pname(k), k) for k, v in enumerate(pref.phi_names) if not pref.phi_identified(k)}
    if msgs:
        j["phi_message"] = "; ".join(f"{v}: {m}" for v, m in msgs.items())
    noise = seed_noise(pref.df)
    j["noise"] = noise if noise else {"line": NO_SEEDS_LINE}
    if with_sensitivity:
        t = time.perf_counter()
        j["sensitivity"] = sensitivity(kept, pref, base, delta, base if pref is per else None, e_level)
        j["sensitivity"]["seconds"] = round(time.perf_counter() - t, 2)
    if power_sims > 0:
        j["power"] = power(pref, base, noise, n_sims=power_sims, seed=seed)
    return j


def paired_weights(df: pd.DataFrame, n_boot: int, seed: int) -> np.ndarray:
    """One paired draw (matched design points) over a whole table, for fits of its subsets."""
    return resample_weights(n_boot, np.zeros(len(df), int), np.random.default_rng(seed), match_keys(df))
