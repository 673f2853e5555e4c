"""The joint fit's referee checks (analysis/joint.py), each on a synthetic table built to have the
property: level-only and phi probes, cell and paired bootstrap, seed noise, sensitivity, power,
and the bad inputs of the joint fit."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from megaloop.analysis.bootstrap import percentile_ci, resample_weights
from megaloop.analysis.cli import fit_main
from megaloop.analysis.fit import fit_law
from megaloop.analysis.joint import (compare_models, conclusions, joint_report, phi_summary, power,
                                     seed_noise, sensitivity)
from megaloop.analysis.law import N_BASE
from megaloop.analysis.table import cell_keys, match_keys, validate

TRUE = dict(E=1.5, A=400.0, alpha=0.35, B=400.0, beta=0.3)
ONCE = (6e3, 14e3, 25e3, 39e3)          # n_once per width; the group is twice n_once at r = 1
BUDGETS = (6.3e11, 2e12, 6.3e12)


def law(n_once, n_rec, r, tokens, phi, A=TRUE["A"], E=TRUE["E"]):
    n_eff = n_once + r ** phi * n_rec
    return E + A * n_eff ** -TRUE["alpha"] + TRUE["B"] * tokens ** -TRUE["beta"]


def design(variants: dict[str, dict], seeds=(0,), sd=0.003, shared_sd=0.0, rng_seed=0,
           r_sets=None) -> pd.DataFrame:
    """Rows of every variant at every (width, r, budget) and seed. variants: name -> dict(phi, A).
    shared_sd: a disturbance of log loss per design point (n_once, r, budget) that every variant
    there shares (what a paired bootstrap cancels); sd: independent per-run noise."""
    rng = np.random.default_rng(rng_seed)
    shared: dict = {}
    rows = []
    for v, p in variants.items():
        for n_once in ONCE:
            for r in (r_sets or {}).get(v, (1, 2, 4) if v == "baseline" else (2, 4)):
                n_rec = 2 * n_once / r
                for c in BUDGETS:
                    tokens = c / (6 * (n_once + r * n_rec))
                    key = (n_once, r, c)
                    shared.setdefault(key, rng.normal(0, shared_sd) if shared_sd else 0.0)
                    for s in seeds:
                        loss = law(n_once, n_rec, r, tokens, p["phi"], p.get("A", TRUE["A"]))
                        loss *= np.exp(shared[key] + rng.normal(0, sd))
                        rows.append(dict(run=f"{v}_r{r}_n{int(n_once)}_c{c:.2g}_s{s}", variant=v, n_once=n_once,
                                         n_rec=n_rec, r=r, tokens=tokens, flops=c, loss=loss, seed=s,
                                         n_adapter=0.05 * n_rec if r > 1 else 0.0))
    return validate(pd.DataFrame(rows))


def _joint(df, n_boot=60, **kw):
    fits = {}
    for v in pd.unique(df["variant"]):
        fits[v] = fit_law(df[df["variant"] == v], n_boot=0, profile=False, holdout=False)
    return joint_report(df, fits, list(pd.unique(df["variant"])), "baseline", 1e-3, n_boot, 0, False,
                        power_sims=0, with_sensitivity=kw.pop("with_sensitivity", False), **kw), fits


@pytest.mark.slow  # joint fits with a paired bootstrap
def test_level_only_probe_prefers_per_variant_level_and_covers_zero():
    """A probe that differs from the baseline only in level (same phi, A 8 % higher): the robust
    LR test rejects the shared-level model, dphi is reported under the per-variant-level model,
    and its paired interval covers 0."""
    df = design({"baseline": dict(phi=0.6), "probe": dict(phi=0.6, A=TRUE["A"] * 1.08)}, sd=0.003)
    j, _ = _joint(df)
    c = j["model_comparison"]
    assert c["preferred"] == "per_variant_level" and c["p"] < 0.05 and c["df"] == 1
    assert c["dphi_reported_under"] == "per_variant_level" and j["model"] == "per_variant_level"
    lo, hi = j["dphi_ci"]["probe"]
    assert lo < 0 < hi
    assert j["level_offsets"]["probe"]["dlogA"] == pytest.approx(np.log(1.08), abs=0.03)


def test_phi_probe_is_detected_and_shared_level_kept():
    """A probe whose phi truly differs (0.3 vs 0.8, same A): the shared-level model is not
    rejected, and the paired dphi interval excludes 0 on the right side."""
    df = design({"baseline": dict(phi=0.8), "probe": dict(phi=0.3)}, sd=0.002)
    j, _ = _joint(df)
    assert j["model_comparison"]["p"] > 0.05 and j["model"] == "shared_level"
    assert j["dphi"]["probe"] == pytest.approx(-0.5, abs=0.15)
    assert j["dphi_ci"]["probe"][1] < 0


def test_cell_bootstrap_keeps_seeds_and_matched_cells_together():
    """Cell resampling: every resample gives all seeds of a cell one weight, and each variant
    keeps its number of cells; paired resampling: the cells of both variants at one design point
    share a weight."""
    df = design({"baseline": dict(phi=0.6), "probe": dict(phi=0.6)}, seeds=(0, 1, 2))
    cells = cell_keys(df)
    assert len(np.unique(cells)) == len(df) // 3
    strata = pd.factorize(df["variant"])[0]
    w = resample_weights(50, strata, np.random.default_rng(1), cells)
    for c in np.unique(cells):
        assert (w[:, cells == c] == w[:, cells == c][:, :1]).all()
    for s in np.unique(strata):
        n_cells = len(np.unique(cells[strata == s]))
        assert (w[:, strata == s].sum(1) == 3 * n_cells).all()
    match = match_keys(df)
    wp = resample_weights(50, np.zeros(len(df), int), np.random.default_rng(1), match)
    both = [m for m in np.unique(match) if df["variant"][match == m].nunique() == 2]
    assert both
    for m in both:
        assert (wp[:, match == m] == wp[:, match == m][:, :1]).all()


@pytest.mark.slow  # two bootstraps of a joint fit
def test_paired_bootstrap_narrower_than_unpaired_on_correlated_cells():
    """With a large disturbance shared by both variants at each design point (and little
    independent noise), the paired bootstrap's dphi interval is narrower than the unpaired
    (cells resampled within each variant) one: pairing cancels what the variants share."""
    df = design({"baseline": dict(phi=0.6), "probe": dict(phi=0.6)}, sd=0.0005, shared_sd=0.01, rng_seed=3)
    widths = {}
    for paired in (True, False):
        f = fit_law(df, n_boot=80, joint=True, profile=False, holdout=False, paired=paired)
        s = f.samples()
        lo, hi = percentile_ci(s["phi:probe"] - s["phi:baseline"])
        widths[paired] = hi - lo
    assert widths[True] < 0.7 * widths[False]


def test_seed_noise_recovered_by_budget():
    """Pooled per-run SD inside cells recovers the generating noise (0.01 in log loss), with
    df = sum(n_cell - 1); a table with one seed per cell has no noise estimate."""
    df = design({"baseline": dict(phi=0.6)}, seeds=(0, 1, 2, 3), sd=0.01, rng_seed=5)
    n = seed_noise(df)
    n_cells = len(np.unique(cell_keys(df)))
    assert n["df"] == 3 * n_cells
    assert n["sd_log"] == pytest.approx(0.01, rel=0.15)
    assert [r["budget"] for r in n["by_budget"]] == sorted(BUDGETS)
    for r in n["by_budget"]:
        assert r["sd_log"] == pytest.approx(0.01, rel=0.3) and r["df"] == 3 * n_cells // 3
    assert seed_noise(df[df["seed"] == "0"]) is None


@pytest.mark.slow  # a dozen joint fits
def test_sensitivity_rows_and_survival():
    """The sensitivity table has the reference, E free / fixed at two values, every budget left
    out, the adapter moved to N_once and squared loss; on a table with phi = 0.5 and a probe at
    phi 1.0 every row keeps phi < 1 and dphi > 0, and the conclusions say so."""
    df = design({"baseline": dict(phi=0.5), "probe": dict(phi=1.0)}, sd=0.001)
    j, _ = _joint(df, n_boot=40, with_sensitivity=True)
    rows = [r["row"] for r in j["sensitivity"]["rows"]]
    assert rows[0] == "reference" and sum(r.startswith("E fixed") for r in rows) == 2
    assert sum(r.startswith("without budget") for r in rows) == 3
    assert "adapter in N_once" in rows and "squared loss" in rows
    lines = {c["conclusion"]: c for c in j["sensitivity"]["conclusions"]}
    assert lines["phi[baseline] < 1"]["survives"] is True
    assert lines["dphi[probe] > 0"]["survives"] is True


def test_conclusions_survival_logic():
    """The survive line: a claim survives only when every row that estimates it is on the claimed
    side; an interval covering the threshold draws no claim; rows without an estimate are named."""
    summ = {"phi_ci": {"baseline": [0.6, 0.9]}, "dphi_ci": {"p": [0.1, 0.3], "q": [-0.2, 0.1]}}
    rows = [{"phi": 0.8, "dphi": {"p": 0.2, "q": -0.05}}, {"phi": 1.05, "dphi": {"p": 0.1, "q": 0.02}},
            {"phi": 0.7, "dphi": {"p": None, "q": 0.0}}]
    out = {c["conclusion"]: c for c in conclusions(rows, summ, "baseline", ["p", "q"])}
    assert out["phi[baseline] < 1"]["survives"] is False
    assert out["dphi[p] > 0"]["survives"] is True and "1 row(s) cannot estimate it" in out["dphi[p] > 0"]["line"]
    q = next(c for k, c in out.items() if k.startswith("dphi[q]"))
    assert q["survives"] is None and "not distinguishable" in q["conclusion"]


@pytest.mark.slow  # simulated studies
def test_power_monotone_and_noise_sensitive():
    """Detection rates rise with the simulated dphi (from ~5 % or less at 0 to 1 at a large
    shift), and more noise gives a larger minimum detectable dphi."""
    df = design({"baseline": dict(phi=0.6), "probe": dict(phi=0.6)}, sd=0.002)
    f = fit_law(df, n_boot=0, joint=True, profile=False, holdout=False)
    grid = (0.0, 0.15, 0.6)
    lo = power(f, "baseline", {"by_budget": [], "sd_log": 0.002}, n_sims=10, dphis=grid, seed=1)["variants"]["probe"]
    hi = power(f, "baseline", {"by_budget": [], "sd_log": 0.02}, n_sims=10, dphis=grid, seed=1)["variants"]["probe"]
    assert lo["detection_rate"][0] <= 0.2 and lo["detection_rate"][-1] == 1.0
    assert lo["detection_rate"] == sorted(lo["detection_rate"])
    assert lo["min_detectable_dphi"] is not None
    assert hi["min_detectable_dphi"] is None or hi["min_detectable_dphi"] > lo["min_detectable_dphi"]
    assert hi["null_sd"] > 3 * lo["null_sd"]


def _csv(tmp_path, df, name="t.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return str(p)


def test_joint_without_a_shared_budget_is_refused(tmp_path, capsys):
    """A --joint table whose probe shares no budget with the baseline: one line saying their
    levels cannot be separated, exit 2, no traceback."""
    df = design({"baseline": dict(phi=0.6), "probe": dict(phi=0.6)})
    df = df[(df["variant"] == "baseline") & (df["flops"] < 6e12) | (df["variant"] == "probe") & (df["flops"] > 6e12)]
    assert fit_main([_csv(tmp_path, df), "--joint", "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "share no budget" in err and "cannot be separated" in err and "Traceback" not in err


def test_repeated_cells_need_a_seed_column(tmp_path, capsys):
    """Two runs of one cell without a seed column are refused (exit 2) with the fix named; with
    the seed column they are one cell of two seeds."""
    df = design({"baseline": dict(phi=0.6)}, seeds=(0, 1))
    assert fit_main([_csv(tmp_path, df.drop(columns="seed")), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "add a `seed` column" in err and "sweep collect" in err
    cells = cell_keys(validate(df))
    assert len(np.unique(cells)) == len(df) // 2


def test_level_offsets_gradient_matches_finite_differences():
    """The objective's analytic gradient with per-variant offsets of log A and log E (the
    --level-e layout: a, b, e, alpha, beta, phis, dA.., dE..) equals central finite differences,
    and with a huge Huber delta the objective is half the summed squared log residual of
    predict_log_loss (two independent paths through the offsets)."""
    from megaloop.analysis.law import LawData, objective, predict_log_loss, to_raw

    rng = np.random.default_rng(0)
    R = 40
    data = LawData.build(rng.uniform(1e4, 5e4, R), rng.uniform(1e4, 5e4, R), rng.choice([1, 2, 4], R),
                         rng.uniform(1e5, 1e6, R), rng.uniform(3, 5, R), rng.integers(0, 3, R), 3,
                         level_index=rng.integers(-1, 2, R), n_level=2, e_level=True)
    assert data.n_params == N_BASE + 3 + 4
    x = np.array([[1.0, 1.0, 0.5, 0.3, 0.3, 0.5, 0.4, 0.7, 0.1, -0.2, 0.05, -0.1]])
    x = x + rng.normal(0, 0.05, (3, x.shape[1]))
    f, g = objective(x, data, 0.05)
    h = 1e-6
    for i in range(data.n_params):
        xp, xm = x.copy(), x.copy()
        xp[:, i] += h
        xm[:, i] -= h
        num = (objective(xp, data, 0.05)[0] - objective(xm, data, 0.05)[0]) / (2 * h)
        assert np.allclose(num, g[:, i], rtol=1e-5, atol=1e-8), i
    res = predict_log_loss(to_raw(x[0], data), data) - data.log_l
    assert objective(x[:1], data, 1e6)[0][0] == pytest.approx(0.5 * np.sum(res ** 2), rel=1e-10)
