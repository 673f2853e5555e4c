"""Iso-FLOP analysis: grouping, parabola vertices, intervals, frontier."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from megaloop.analysis.isoflop import budget_column, fit_parabola, isoflop
from megaloop.analysis.make_example import REFERENCE, accounting, law, synthetic_table


def test_parabola_vertex_exact_for_quadratic():
    """A noisy-free parabola in log N gives back its vertex exactly; with noise the sampled
    interval covers it."""
    x = np.log(np.geomspace(1e7, 1e9, 6))
    x0, l0 = np.log(1e8), 2.5
    y = l0 + 0.05 * (x - x0) ** 2
    p = fit_parabola(x, y)
    assert p["N_opt"] == pytest.approx(1e8, rel=1e-6) and p["L_opt"] == pytest.approx(l0, abs=1e-9)
    rng = np.random.default_rng(0)
    pn = fit_parabola(x, y + 0.002 * rng.standard_normal(6))
    assert pn["N_opt_ci"][0] < 1e8 < pn["N_opt_ci"][1] and pn["L_opt_ci"][0] < l0 < pn["L_opt_ci"][1]
    assert fit_parabola(x, -(x - x0) ** 2)["N_opt"] is None  # no curvature, no minimum


def test_budget_grouping_rounds_and_falls_back_to_6nd():
    """Budgets group on 3 significant digits of flops; without flops, 6 (n_once + r n_rec) D."""
    df = pd.DataFrame({"n_once": [1e6, 1e6], "n_rec": [1e6, 0.0], "r": [2.0, 1.0],
                       "tokens": [1e9, 1e9], "flops": [4.6412e17, 4.6398e17]})
    assert list(budget_column(df)) == [4.64e17, 4.64e17]
    assert list(budget_column(df.drop(columns="flops"))) == [1.8e16, 6e15]


def test_noise_free_grid_matches_law_optimum_and_reference():
    """On noise-free losses from the law, each group's vertex L* is within 0.01 of the law's own
    minimum along that iso-FLOP line, and at r = 1 L* is within 0.03 of the reference study's
    compute-optimal losses (2.852 ... 2.309) -- a check of the example grid's accounting too."""
    df = synthetic_table(0, noise=0.0)
    iso = isoflop(df)
    assert len(iso["groups"]) == 24 and all(g.get("N_opt") for g in iso["groups"])
    for g in iso["groups"]:
        s = np.linspace(4, 40, 400)
        acc = np.array([accounting(si, int(g["r"])) for si in s])  # every width on the budget line
        losses = law(acc[:, 0], acc[:, 1], g["r"], g["budget"] / acc[:, 2], **REFERENCE)
        assert g["L_opt"] == pytest.approx(losses.min(), abs=0.01)
    ref = [2.852, 2.718, 2.605, 2.498, 2.401, 2.309]
    r1 = next(f for f in iso["frontier"] if f["r"] == 1)
    got = [p["L_opt"] for p in r1["points"]]
    np.testing.assert_allclose(got, ref, atol=0.03)
    assert 0.4 < r1["N_exponent"] < 0.8  # N* grows sub-linearly with compute


def test_small_groups_skipped_and_variants_kept_apart():
    """Groups with fewer than 3 sizes are reported as skipped; variants form separate groups."""
    df = synthetic_table(0, noise=0.0, rs=(1,))
    df2 = df.copy()
    df2["run"] += "_v"
    df = pd.concat([df.assign(variant="baseline"), df2.assign(variant="other")], ignore_index=True)
    df = df.drop(index=[0, 1])  # budget 4.64e17 of baseline keeps 2 sizes
    iso = isoflop(df)
    skipped = [g for g in iso["groups"] if g.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["variant"] == "baseline" and skipped[0]["budget"] == 4.64e17
    assert {f["variant"] for f in iso["frontier"]} == {"baseline", "other"}


def test_three_size_group_is_one_line_without_library_warnings():
    """Contract: a budget with exactly 3 sizes gets its vertex (the parabola through the 3 points,
    exactly: equal to the vertex of the interpolating polynomial) but no interval, with no library
    warning (statsmodels divides by zero residual dof there), and the text says so in one line."""
    import warnings

    from megaloop.analysis.isoflop import format_isoflop

    df = synthetic_table(0, noise=0.0, rs=(1,))
    df = df[df["flops"] != 4.64e17].copy()
    keep = df.groupby("flops")["n_once"].transform(lambda s: s.rank() <= 3) | (df["flops"] != 1e18)
    df = df[keep]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iso = isoflop(df)
    g = next(g for g in iso["groups"] if g["budget"] == 1e18)
    assert g["n_points"] == 3 and g["N_opt_ci"] is None and "no interval" in g["no_interval"]
    sub = df[df["flops"] == 1e18]
    x = np.log(sub.n_once + sub.r * sub.n_rec).to_numpy()
    c2, c1, c0 = np.polyfit(x, sub.loss.to_numpy(), 2)
    assert g["N_opt"] == pytest.approx(np.exp(-c1 / (2 * c2)), rel=1e-9)
    text = format_isoflop(iso)
    assert sum("only 3 sizes" in line for line in text.splitlines()) == 1
