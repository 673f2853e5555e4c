"""A finished sweep into a committed study folder: tables, the fit, recurrence diagnostics, figures.

    python -m megaloop.analysis.study_report SWEEP_DIR --out results/cpu_study [--bootstrap 1000]

writes into OUT:
  fit_table.csv     one row per finished run (megaloop sweep collect), with tokens per parameter
  test_time.csv     validation loss of every run at every evaluated r_test
  fit.json          `megaloop fit --json --joint` on fit_table.csv (per variant, with intervals)
  fit.txt           the same fit as text
  recurrence.csv    per looped run and pass i: relative change of the recurrent state from pass i-1,
                    the loss when stopping after i passes; and the injection adapter's e/s split
  plots/            the fit's figures, test_time.png, state_change.png
  report.md         the tables of all of the above
The fit runs as the `megaloop fit` command a user would type, so the study reports exactly what the
command prints. Re-running overwrites OUT's files (never the sweep's runs).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .table import TEST_TIME_SUFFIX  # noqa: E402


def _fit(table: str, out: str, n_boot: int) -> dict:
    """`megaloop fit --json` as a subprocess; fit.txt is the same report as text (one fit, two views)."""
    from .report import format_report

    cmd = [sys.executable, "-m", "megaloop.cli", "fit", table, "--joint", "--bootstrap", str(n_boot)]
    res = subprocess.run(cmd + ["--json", "--plots", os.path.join(out, "plots")], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"megaloop fit failed ({res.returncode}): {res.stderr.strip()}")
    with open(os.path.join(out, "fit.json"), "w") as f:
        f.write(res.stdout)
    fit = json.loads(res.stdout)
    with open(os.path.join(out, "fit.txt"), "w") as f:
        f.write(format_report(fit) + "\n")
    return fit


def recurrence_rows(sweep_dir: str, table: pd.DataFrame, factor: int = 2) -> list[dict]:
    """Pass-by-pass diagnostics of every looped run, on its first validation batch, up to factor * r."""
    import torch

    from megaloop.data.loader import eval_batches
    from megaloop.data.prepare import ensure_prepared
    from megaloop.pretrained import load_pretrained

    from .recurrence import adapter_split, pass_by_pass

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows, valid = [], {}
    runs = table[(table.r > 1) & ~table.variant.astype(str).str.endswith(TEST_TIME_SUFFIX)]  # each run once
    for _, t in runs.iterrows():
        run_dir = os.path.join(sweep_dir, "runs", t["run"])
        model, cfg, _ = load_pretrained(run_dir)
        key = (cfg.model.vocab_size, cfg.model.seq_len)
        if key not in valid:
            data = ensure_prepared(cfg.data, cfg.model.vocab_size, log=lambda *a: None)
            valid[key] = next(iter(eval_batches(data.valid, cfg.model.seq_len, 16)))
        split = adapter_split(model) or {}
        for s in pass_by_pass(model, *valid[key], r_max=factor * int(t["r"])):
            rows.append({"run": t["run"], "variant": t["variant"], "r": int(t["r"]), "flops": t["flops"],
                         "pass": s["pass"], "loss": s["loss"], "rel_change": s["rel_change"],
                         "adapter_s_share": split.get("s_share"), "adapter_spectral_s": split.get("spectral_s")})
    return rows


def plot_test_time(curves: pd.DataFrame, out: str) -> str:
    """Loss at r_test minus loss at the trained r, against r_test / r, one panel per variant."""
    variants = list(dict.fromkeys(curves.variant))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4), squeeze=False, sharey=True)
    colors = {1: "tab:gray", 2: "tab:blue", 4: "tab:orange", 8: "tab:green"}
    for ax, v in zip(axes[0], variants):
        sub = curves[curves.variant == v]
        for run, g in sub.groupby("run", sort=False):
            r = int(g.r.iloc[0])
            at_r = g.loc[g.r_test == r, "loss"]
            if at_r.empty:
                continue
            ax.plot(g.r_test / r, g.loss - float(at_r.iloc[0]), "-o", ms=2.5, lw=1, alpha=0.7,
                    color=colors.get(r, "k"), label=f"r={r}")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.axvline(1, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(v)
        ax.set_xlabel("r_test / r_train")
        ax.set_yscale("symlog", linthresh=0.02)
    axes[0][0].set_ylabel("loss(r_test) - loss(r_train)  [nats]")
    fig.tight_layout()
    path = os.path.join(out, "test_time.png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_state_change(rec: pd.DataFrame, out: str) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    colors = {"baseline": "tab:blue", "truncbptt": "tab:red", "hyperconnect": "tab:green"}
    for run, g in rec.groupby("run", sort=False):
        g = g.dropna(subset=["rel_change"])
        ax.plot(g["pass"], g.rel_change, "-", lw=0.8, alpha=0.6, color=colors.get(g.variant.iloc[0], "k"))
    for v, c in colors.items():
        ax.plot([], [], color=c, label=v)
    ax.set_yscale("log")
    ax.set_xlabel("pass i")
    ax.set_ylabel("||x_i - x_(i-1)|| / ||x_(i-1)||")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "state_change.png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _ci(v, ci, fmt="{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "not identified"
    s = fmt.format(v)
    if ci:
        s += " [" + ", ".join(fmt.format(x) for x in ci) + "]"
    return s


def _variant_fits(fit: dict) -> dict:
    """{variant: fit dict}: the top level is the baseline; `variants` holds the others."""
    out = {"baseline": fit}
    for name, v in (fit.get("variants") or {}).items():
        out.setdefault(name, v)
    return out


def markdown(fit: dict, table: pd.DataFrame, curves: pd.DataFrame, rec: Optional[pd.DataFrame],
             wall: Optional[str]) -> str:
    L = ["# CPU study: results", ""]
    if wall:
        L += [f"Wall time: {wall}.", ""]
    L += [f"{len(table)} finished runs; tokens per unique non-embedding parameter: median "
          f"{table.tokens_per_param.median():.1f}, min {table.tokens_per_param.min():.1f}, "
          f"{(table.tokens_per_param >= 10).sum()} of {len(table)} at >= 10.", ""]
    L += ["## The law per variant (95 % intervals: bootstrap, then profile likelihood)", "",
          "| variant | runs | phi (bootstrap) | phi (profile) | dphi vs baseline | E | alpha | beta | R^2 | at bound | identified |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    def par(f, k):
        if k in (f.get("at_bound") or []):
            return "at bound: not identified"
        ok = (f.get("identified") or {}).get(k, True)
        return _ci(f.get(k), f.get(k + "_ci")) + ("" if ok else " (not identified)")

    for name, f in _variant_fits(fit).items():
        prof = (f.get("profile_ci") or {}).get("phi")
        ident = f.get("identified")
        ident_s = ", ".join(k for k, ok in ident.items() if ok) if isinstance(ident, dict) else ""
        L.append(f"| {name} | {f.get('n_runs', '')} | {_ci(f.get('phi'), f.get('phi_ci'))} | "
                 f"{_ci(f.get('phi'), prof) if prof else '-'} | "
                 f"{_ci(f.get('dphi'), f.get('dphi_ci')) if name != 'baseline' and 'dphi' in f else '-'} | "
                 f"{par(f, 'E')} | {par(f, 'alpha')} | {par(f, 'beta')} | {f.get('r2', float('nan')):.4f} | "
                 f"{', '.join(f.get('at_bound') or []) or '-'} | {ident_s or '-'} |")
    joint = fit.get("joint")
    if joint:
        L += ["", "Joint fit (E, A, alpha, B, beta shared; one phi per variant):", ""]
        prof = joint.get("profile_ci") or {}
        for name, phi in (joint.get("phi") or {}).items():
            p_ci = prof.get(f"phi[{name}]") or prof.get(name)
            L.append(f"- {name}: phi {_ci(phi, (joint.get('phi_ci') or {}).get(name))} (bootstrap)"
                     + (f", {_ci(phi, p_ci)} (profile)" if p_ci else "")
                     + (f", dphi {_ci(joint['dphi'][name], joint['dphi_ci'][name])}" if name != "baseline" else ""))
        L.append(f"- shared: E {par(joint, 'E')}, alpha {par(joint, 'alpha')}, beta {par(joint, 'beta')}, "
                 f"R^2 {joint.get('r2', float('nan')):.4f}, {joint.get('n_runs')} runs")
    hold = fit.get("holdout")
    if hold:
        L += ["", f"Hold-out (refit without the largest budget {float(hold.get('budget')):.3g}, predict its "
                  f"{hold.get('n_runs')} runs): RMSE {float(hold.get('rmse_log')):.4f} in log loss, max |error| "
                  f"{float(hold.get('max_abs_log')):.4f}."]
    if fit.get("diverged"):
        L += ["", f"Runs far from the fit (kept): {', '.join(map(str, fit['diverged']))}"]
    L += ["", "## Runs", "", "| run | d_model | r | budget | tokens | tokens/param | val loss |", "|---|---|---|---|---|---|---|"]
    for _, t in table[~table.variant.astype(str).str.endswith(TEST_TIME_SUFFIX)].iterrows():
        L.append(f"| {t.run} | {t.run.split('_s')[1].split('_')[0]} | {int(t.r)} | {t.flops:.3g} | "
                 f"{int(t.tokens):,} | {t.tokens_per_param:.1f} | {t.loss:.4f} |")
    L += ["", "## Test-time recurrence", "", "Validation loss at r_test (columns) of each looped run, "
          "minus its loss at the trained r; negative = better than at the trained r.", ""]
    looped = curves[curves.r > 1]
    if not looped.empty:
        rts = sorted(looped.r_test.unique())
        L += ["| run | " + " | ".join(f"r={int(x)}" for x in rts) + " |", "|---|" + "---|" * len(rts)]
        for run, g in looped.groupby("run", sort=False):
            base = float(g.loc[g.r_test == g.r.iloc[0], "loss"].iloc[0])
            cells = {int(a): b - base for a, b in zip(g.r_test, g.loss)}
            L.append(f"| {run} | " + " | ".join(f"{cells[int(x)]:+.3f}" if int(x) in cells else "" for x in rts) + " |")
    if rec is not None and not rec.empty:
        L += ["", "## Pass by pass", "", "Relative change of the recurrent state from the previous pass "
              "(first validation batch), and the adapter's state share ||W_s|| / ||W||.", ""]
        L += ["| run | s share | change at pass 2 | at pass r | at pass 2r |", "|---|---|---|---|---|"]
        for run, g in rec.groupby("run", sort=False):
            r = int(g.r.iloc[0])
            ch = dict(zip(g["pass"], g.rel_change))
            share = g.adapter_s_share.iloc[0]
            L.append(f"| {run} | {'-' if pd.isna(share) else f'{share:.3f}'} | {ch.get(2, float('nan')):.2e} | "
                     f"{ch.get(r, float('nan')):.2e} | {ch.get(2 * r, float('nan')):.2e} |")
    L += ["", "Figures: plots/ (the law, iso-FLOP parabolas, bootstrap phi, residuals), test_time.png, "
          "state_change.png.", ""]
    return "\n".join(L)


def build(sweep_dir: str, out: str, n_boot: int = 1000, wall: Optional[str] = None,
          with_recurrence: bool = True) -> dict:
    from megaloop.sweep.collect import collect

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    c = collect(sweep_dir)
    for name in ("fit_table.csv", "test_time.csv"):
        src = os.path.join(sweep_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    table = pd.read_csv(os.path.join(out, "fit_table.csv"))
    curves = pd.read_csv(os.path.join(out, "test_time.csv"))
    fit = _fit(os.path.join(out, "fit_table.csv"), out, n_boot)
    rec = None
    if with_recurrence:
        rows = recurrence_rows(sweep_dir, table)
        if rows:
            with open(os.path.join(out, "recurrence.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
                w.writeheader()
                w.writerows(rows)
            rec = pd.DataFrame(rows)
            plot_state_change(rec, os.path.join(out, "plots"))
    plot_test_time(curves, os.path.join(out, "plots"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(fit, table, curves, rec, wall))
    return {"runs": len(table), "counts": c.counts(), "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megaloop.analysis.study_report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--wall", default=None, help="the study's wall time, as text for the report")
    ap.add_argument("--no-recurrence", action="store_true", help="skip the pass-by-pass diagnostics")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite OUT/report.md from the files already in OUT (no collect, fit or models)")
    a = ap.parse_args(argv)
    if a.markdown_only:
        rec = os.path.join(a.out, "recurrence.csv")
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(markdown(json.load(open(os.path.join(a.out, "fit.json"))),
                             pd.read_csv(os.path.join(a.out, "fit_table.csv")),
                             pd.read_csv(os.path.join(a.out, "test_time.csv")),
                             pd.read_csv(rec) if os.path.isfile(rec) else None, a.wall))
        return 0
    print(json.dumps(build(a.sweep_dir, a.out, a.bootstrap, a.wall, not a.no_recurrence)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
