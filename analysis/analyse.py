"""`analyse`: the whole `megaloop fit` report, from a validated table: the fit of every variant,
the joint fits with their model comparison, seed noise, sensitivity and power (joint.py), the
iso-FLOP frontier and the hold-out check. The fitting itself is fit.py's; this module only
composes it (it sits above fit.py and joint.py, which need nothing from here).
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from .bootstrap import percentile_ci
from .fit import LawFit, fit_law
from .isoflop import isoflop
from .law import N_BASE
from .table import TEST_TIME_SUFFIX


def _baseline(variants: list[str]) -> str:
    return "baseline" if "baseline" in variants else variants[0]


def analyse(df: pd.DataFrame, delta: float = 1e-3, n_boot: int = 1000, seed: int = 0,
            joint: bool = False, drop_outliers: bool = False, e_level: bool = False,
            power_sims: int = 20, sensitivity: bool = True) -> tuple[dict[str, Any], dict[str, LawFit]]:
    """The whole `megaloop fit` report. Without a variant column (or with one variant) the top
    level is the fit of all runs; with several variants the top level is the baseline's fit
    (variant 'baseline', else the first) and `variants` holds every variant's fit plus its phi
    difference to the baseline with a paired bootstrap interval (one draw of matched design
    points shared by all the variants' fits). With joint, `joint` holds the two joint models,
    their comparison, seed noise, the sensitivity table and the power line (joint.py)."""
    from .joint import NO_SEEDS_LINE, joint_report, paired_weights, seed_noise

    fits: dict[str, LawFit] = {}
    variants = list(pd.unique(df["variant"])) if "variant" in df.columns else []
    if len(variants) <= 1:
        fits["all"] = fit_law(df, delta, n_boot, seed, drop_outliers=drop_outliers)
        report = fits["all"].to_dict()
    else:
        base = _baseline(variants)
        if joint:
            from .joint import check_shared_budgets

            check_shared_budgets(df[~df["variant"].astype(str).str.endswith(TEST_TIME_SUFFIX)], base)
        per: dict[str, Any] = {}
        w_all = paired_weights(df, n_boot, seed) if n_boot > 0 else None
        for v in variants:
            m = (df["variant"] == v).to_numpy()
            fits[v] = fit_law(df[m], delta, n_boot, seed, drop_outliers=drop_outliers,
                              boot_weights=None if w_all is None else w_all[:, m])
            per[v] = fits[v].to_dict()
        for v in variants:
            fb, fv = fits[base], fits[v]
            ok = fb.phi_identified() and fv.phi_identified()
            per[v]["dphi"] = float(fv.raw[N_BASE] - fb.raw[N_BASE]) if ok else None
            # one paired draw for all variants: the difference of draws is a draw of dphi
            per[v]["dphi_ci"] = (percentile_ci(fv.boot[:, N_BASE] - fb.boot[:, N_BASE])
                                 if ok and fv.boot is not None and fb.boot is not None else None)
        report = dict(per[base])
        report["fit_of"] = f"variant {base!r} (baseline)"
        report["baseline"] = base
        report["variants"] = per
        if joint:
            # A sampled-depth run's test-time rows (variant *_tt) repeat runs the table already
            # holds once (under their own variant): pooled into the shared parameters they would
            # count those runs several times, so the joint fit leaves them out.
            pooled = [v for v in variants if not str(v).endswith(TEST_TIME_SUFFIX)]
            report["joint"] = joint_report(df[df["variant"].isin(pooled)], fits, pooled, base, delta, n_boot,
                                           seed, drop_outliers, e_level=e_level, power_sims=power_sims,
                                           with_sensitivity=sensitivity)
            if len(pooled) < len(variants):
                report["joint"]["left_out"] = [v for v in variants if v not in pooled]
    noise = seed_noise(df)
    report["noise"] = noise if noise else {"line": NO_SEEDS_LINE}
    report["isoflop"] = isoflop(df, seed=seed)
    return report, fits
