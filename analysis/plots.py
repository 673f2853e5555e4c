"""Figures for `megaloop fit --plots DIR` (matplotlib Agg, each saved as PNG and PDF).

law        loss minus the fitted data term B D^-beta against the effective size
           N_once + r^phi N_rec, coloured by r, with the fitted E + A N^-alpha: if the law holds,
           every r collapses onto the one curve.
isoflop    loss against compute-equivalent N per budget, with the OLS parabolas.
phi_bootstrap  bootstrap distribution of phi (per variant).
profile    the profile statistic D of every parameter (one row per fit) with the chi2(1) 95 %
           threshold: where D stays under it up to an edge, the data do not identify that side.
residuals  log-loss residuals against the prediction; runs far from the fit marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fit import LawFit  # noqa: E402
from .law import N_BASE  # noqa: E402


def _save(fig, out: Path, name: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(str(p))
    plt.close(fig)
    return paths


def _r_colors(rs) -> dict[float, Any]:
    cmap = plt.get_cmap("viridis")
    rs = sorted(set(float(r) for r in rs))
    return {r: cmap(i / max(1, len(rs) - 1)) for i, r in enumerate(rs)}


def plot_law(fits: dict[str, LawFit], out: Path) -> list[str]:
    names = [n for n in fits if n != "joint"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        f = fits[name]
        p = f.law_params()
        d = f.df
        n_eff = d["n_once"] + d["r"] ** p["phi"] * d["n_rec"]
        y = d["loss"] - p["B"] * d["tokens"] ** (-p["beta"])
        colors = _r_colors(d["r"])
        for r, c in colors.items():
            m = d["r"] == r
            ax.scatter(n_eff[m], y[m], s=14, color=c, label=f"r={r:g}")
        grid = np.geomspace(n_eff.min() / 1.3, n_eff.max() * 1.3, 200)
        ax.plot(grid, p["E"] + p["A"] * grid ** (-p["alpha"]), "k-", lw=1, label="E + A N^-alpha")
        ax.set_xscale("log")
        phi = "n/a" if f.phi() is None else f"{f.phi():.3f}"
        ax.set_title(f"{name}: phi={phi}, alpha={p['alpha']:.3f}")
        ax.set_xlabel("effective params N_once + r^phi N_rec")
        ax.set_ylabel("loss - B D^-beta")
        ax.legend(fontsize=8)
    return _save(fig, out, "law")


def plot_isoflop(iso: dict[str, Any], df, out: Path) -> list[str]:
    groups = [g for g in iso["groups"] if g.get("coef")]
    if not groups:
        return []
    keys = sorted({(g.get("variant", ""), g["r"]) for g in groups})
    ncol = min(4, len(keys))
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), squeeze=False)
    budgets = sorted({g["budget"] for g in groups})
    cmap = plt.get_cmap("plasma")
    bcol = {b: cmap(i / max(1, len(budgets) - 1) * 0.85) for i, b in enumerate(budgets)}
    from .isoflop import budget_column
    d = df.assign(budget=budget_column(df), N=df["n_once"] + df["r"] * df["n_rec"])
    for ax, (variant, r) in zip(axes.ravel(), keys):
        for g in groups:
            if (g.get("variant", ""), g["r"]) != (variant, r):
                continue
            m = (d["r"] == r) & (d["budget"] == g["budget"])
            if variant:
                m &= d["variant"] == variant
            pts = d[m]
            ax.scatter(pts["N"], pts["loss"], s=12, color=bcol[g["budget"]])
            xs = np.linspace(np.log(pts["N"].min()) - 0.1, np.log(pts["N"].max()) + 0.1, 100)
            c0, c1, c2 = g["coef"]
            xc = xs - g["x_center"]
            ax.plot(np.exp(xs), c0 + c1 * xc + c2 * xc * xc, color=bcol[g["budget"]], lw=1,
                    label=f"C={g['budget']:.3g}")
            if g.get("on_frontier"):
                ax.plot([g["N_opt"]], [g["L_opt"]], "x", color=bcol[g["budget"]])
        ax.set_xscale("log")
        ax.set_title((f"{variant}, " if variant else "") + f"r={r:g}")
        ax.set_xlabel("N = n_once + r n_rec")
        ax.set_ylabel("loss")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out, "isoflop")


def plot_phi_bootstrap(fits: dict[str, LawFit], out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    any_drawn = False
    allv = np.concatenate([f.boot[:, N_BASE:N_BASE + len(f.phi_names)][:, np.array(f.identifiable)].ravel()
                           for f in fits.values() if f.boot is not None] or [np.zeros(1)])
    bins = np.linspace(allv.min(), allv.max() + 1e-9, 50)  # shared bins: variants comparable
    for name, f in fits.items():
        if f.boot is None:
            continue
        for k, pname in enumerate(f.phi_names):
            if not f.identifiable[k]:
                continue
            label = f"joint:{pname}" if name == "joint" else name
            ax.hist(f.boot[:, N_BASE + k], bins=bins, alpha=0.45, density=True, label=label,
                    histtype="stepfilled" if name != "joint" else "step")
            ax.axvline(f.raw[N_BASE + k], color="k", lw=0.6)
            any_drawn = True
    ax.set_xlabel("phi (bootstrap)")
    ax.set_ylabel("density")
    if any_drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "phi not identifiable / no bootstrap", ha="center", transform=ax.transAxes)
    return _save(fig, out, "phi_bootstrap")


def plot_profiles(fits: dict[str, LawFit], out: Path) -> list[str]:
    from .profile import CHI2_95

    rows = [(n, f) for n, f in fits.items() if f.profile is not None and f.profile.profiles]
    if not rows:
        return []
    ncol = max(len(f.profile.profiles) for _, f in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.0 * ncol, 2.6 * len(rows)), squeeze=False)
    for (name, f), row in zip(rows, axes):
        for ax, (pname, p) in zip(row, f.profile.profiles.items()):
            # show where D is below 3x the threshold (and one point beyond): the whole region when flat
            inside = np.flatnonzero(p.stat <= 3 * CHI2_95)
            lo_i, hi_i = max(inside.min() - 1, 0), min(inside.max() + 1, len(p.values) - 1)
            ax.plot(p.values[lo_i:hi_i + 1], p.stat[lo_i:hi_i + 1], ".-", ms=3, lw=0.8, color="C0")
            ax.axhline(CHI2_95, color="k", lw=0.6, ls="--")
            ax.axvline(p.estimate, color="C3", lw=0.6)
            for v, is_open in zip(p.ci, p.open):
                if not is_open:
                    ax.axvline(v, color="C2", lw=0.6, ls=":")
            if pname in ("A", "B"):  # these span decades
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylim(0, 3 * CHI2_95)
            ax.set_title(f"{name}: {pname}" + ("" if p.identified else " (not identified)"), fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in row[len(f.profile.profiles):]:
            ax.axis("off")
        row[0].set_ylabel("D = 2k (F - F_min)", fontsize=8)
    return _save(fig, out, "profile")


def plot_residuals(fits: dict[str, LawFit], out: Path) -> list[str]:
    names = [n for n in fits if n != "joint"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        f = fits[name]
        d = f.df
        colors = _r_colors(d["r"])
        for r, c in colors.items():
            m = d["r"] == r
            ax.scatter(np.exp(d["pred_log_loss"][m]), d["log_residual"][m], s=12, color=c, label=f"r={r:g}")
        ax.axhline(0, color="k", lw=0.6)
        far = [d["run"] for d in f.diverged]
        m = d["run"].isin(far)
        if m.any():
            ax.scatter(np.exp(d["pred_log_loss"][m]), d["log_residual"][m], s=40, facecolors="none",
                       edgecolors="r", label="far from the fit")
        ax.set_title(f"{name}: residuals ({len(f.diverged)} far from the fit)")
        ax.set_xlabel("predicted loss")
        ax.set_ylabel("log loss - log prediction")
        ax.legend(fontsize=8)
    return _save(fig, out, "residuals")


def make_plots(report: dict[str, Any], fits: dict[str, LawFit], df, out_dir: str | Path) -> list[str]:
    """All figures into out_dir; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = plot_law(fits, out)
    paths += plot_isoflop(report["isoflop"], df, out)
    paths += plot_phi_bootstrap(fits, out)
    paths += plot_profiles(fits, out)
    paths += plot_residuals(fits, out)
    return paths
