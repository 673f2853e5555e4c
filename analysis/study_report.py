"""A finished sweep into a committed study folder: tables, the fit, recurrence diagnostics, figures.

    python -m megaloop.analysis.study_report SWEEP_DIR --out results/cpu_study [--bootstrap 1000]

writes into OUT:
  fit_table.csv     the rows the law is fitted to: one per finished run (megaloop sweep collect), with
                    --fold variants relabelled and --control variants left out (analysis/controls.py)
  fit_table_all.csv every collected row, when --fold or --control changed the law's table
  controls.json     paired control contrasts and depth-control equivalents (with --control / --depth)
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


def _referee_sections(j: dict) -> list[str]:
    """Model comparison, seed noise, sensitivity and power of a joint fit (fit.json `joint`)."""
    L: list[str] = []
    c = j.get("model_comparison")
    if c:
        L += ["", "### Model comparison", "", f"{c['test']}.", "",
              "| model | parameters | objective | dphi per probe (paired bootstrap) |", "|---|---|---|---|"]
        for name, m in c["models"].items():
            dp = "; ".join(f"{v} {_ci(m['dphi'][v], m['dphi_ci'][v], '{:+.3f}')}" for v in m.get("dphi", {})
                           if v != "baseline")
            L.append(f"| {name}{' (' + m['note'] + ')' if m.get('note') else ''}: {m['description']} | "
                     f"{m['n_params']} | {m['objective']:.6g} | {dp} |")
        L += ["", f"Statistic {c['statistic']:.2f} on {c['df']} df, p = {c['p']:.3g}: dphi is reported under "
                  f"the {c['dphi_reported_under'].replace('_', '-')} model."]
    n = j.get("noise")
    if n:
        L += ["", "### Seed noise", ""]
        if "line" in n:
            L.append(n["line"][0].upper() + n["line"][1:] + ".")
        else:
            L += [f"Pooled per-run SD inside cells with several seeds ({n['intervals']}).", "",
                  "| budget | SD(log loss) | SD(loss) | df | cells |", "|---|---|---|---|---|"]
            for r in n["by_budget"]:
                L.append(f"| {r['budget']:.3g} | {r['sd_log']:.4f} | {r['sd_loss']:.4f} | {r['df']} | {r['n_cells']} |")
            L.append(f"| all | {n['sd_log']:.4f} | {n['sd_loss']:.4f} | {n['df']} | |")
    sens = j.get("sensitivity")
    if sens:
        probes = list(dict.fromkeys(v for r in sens["rows"] for v in (r.get("dphi") or {})))
        L += ["", "### Sensitivity", "", f"The preferred model refitted under each specification ({sens['refits']}; "
              f"adapter {sens['adapter_convention']}).", "",
              "| specification | runs | phi[baseline] | " + " | ".join(f"dphi[{v}]" for v in probes) + " |",
              "|---|---|---|" + "---|" * len(probes)]
        for r in sens["rows"]:
            if "skipped" in r:
                L.append(f"| {r['row']} | {r['n_runs']} | skipped: {r['skipped']} |" + " |" * len(probes))
                continue
            cells = " | ".join("n/a" if r["dphi"].get(v) is None else f"{r['dphi'][v]:+.3f}" for v in probes)
            L.append(f"| {r['row']} | {r['n_runs']} | {'n/a' if r.get('phi') is None else format(r['phi'], '.3f')} | {cells} |")
        L += [""] + [f"- {c['line']}" for c in sens["conclusions"]]
    pw = j.get("power")
    if pw:
        L += ["", "### Power", ""]
        if "skipped" in pw:
            L.append(pw["skipped"])
        else:
            L += [f"{pw['n_sims']} simulated tables per dphi in {pw['dphi_grid']} (noise: {pw['noise']}; refit: "
                  f"{pw['refit']}); {pw['criterion']}.", ""]
            for v, d in pw["variants"].items():
                rates = ", ".join(f"{x:.2f}" for x in d["detection_rate"])
                L.append(f"- {v}: {d['line']} (detection rates {rates})")
    return L


def markdown(fit: dict, table: pd.DataFrame, curves: pd.DataFrame, rec: Optional[pd.DataFrame],
             wall: Optional[str], controls: Optional[dict] = None) -> str:
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
        model = joint.get("model")
        what = ("A per variant (the preferred model, see the comparison below); E, alpha, B, beta shared"
                if model == "per_variant_level" else "E, A, alpha, B, beta shared")
        L += ["", f"Joint fit ({what}; one phi per variant):", ""]
        prof = joint.get("profile_ci") or {}
        for name, phi in (joint.get("phi") or {}).items():
            p_ci = prof.get(f"phi[{name}]") or prof.get(name)
            why = (joint.get("not_identified_because") or {}).get(f"phi[{name}]")
            L.append(f"- {name}: " + (f"phi not identified: {why}" if why and phi is None else
                                      f"phi {_ci(phi, (joint.get('phi_ci') or {}).get(name))} (bootstrap)")
                     + (f", {_ci(phi, p_ci)} (profile)" if p_ci and phi is not None else "")
                     + (f", dphi {_ci(joint['dphi'][name], joint['dphi_ci'][name])}" if name != "baseline" else ""))
        L.append(f"- shared: E {par(joint, 'E')}, alpha {par(joint, 'alpha')}, beta {par(joint, 'beta')}, "
                 f"R^2 {joint.get('r2', float('nan')):.4f}, {joint.get('n_runs')} runs")
        L += _referee_sections(joint)
    if controls:
        from . import controls as C
        if controls.get("fold"):
            L += ["", "Folded into the law: " + ", ".join(f"{a} as {b}" for a, b in controls["fold"].items())
                  + " (fixed-width depth controls enter as r = 1 rows of the baseline)."]
        L += C.markdown(controls.get("contrasts") or [], controls.get("depth"))
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


def _controls(out: str, fold: dict, contrast: dict, depth: dict) -> Optional[dict]:
    """Split the collected table into the law's rows and the controls (analysis/controls.py)."""
    from . import controls as C

    if not (fold or contrast or depth):
        return None
    all_rows = pd.read_csv(os.path.join(out, "fit_table.csv"))
    all_rows.to_csv(os.path.join(out, "fit_table_all.csv"), index=False)
    C.law_table(all_rows, fold, contrast).to_csv(os.path.join(out, "fit_table.csv"), index=False)
    result = {"fold": fold, "contrasts": C.paired_contrasts(all_rows, contrast),
              "depth": C.depth_equivalents(all_rows, depth) if depth else None}
    with open(os.path.join(out, "controls.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def build(sweep_dir: str, out: str, n_boot: int = 1000, wall: Optional[str] = None,
          with_recurrence: bool = True, fold: Optional[dict] = None, contrast: Optional[dict] = None,
          depth: Optional[dict] = None) -> dict:
    from megaloop.sweep.collect import collect

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    c = collect(sweep_dir)
    for name in ("fit_table.csv", "test_time.csv"):
        src = os.path.join(sweep_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    controls = _controls(out, fold or {}, contrast or {}, depth or {})
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
        f.write(markdown(fit, table, curves, rec, wall, controls))
    return {"runs": len(table), "counts": c.counts(), "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megaloop.analysis.study_report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--wall", default=None, help="the study's wall time, as text for the report")
    ap.add_argument("--no-recurrence", action="store_true", help="skip the pass-by-pass diagnostics")
    ap.add_argument("--fold", action="append", default=[], metavar="VARIANT=INTO",
                    help="fit VARIANT's rows as INTO's (fixed-width depth controls into the baseline)")
    ap.add_argument("--control", action="append", default=[], metavar="VARIANT=REF",
                    help="leave VARIANT out of the law; report its paired loss difference to REF")
    ap.add_argument("--depth", action="append", default=[], metavar="VARIANT=K",
                    help="VARIANT is the r = 1 depth control with K unique recurrent blocks")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite OUT/report.md from the files already in OUT (no collect, fit or models)")
    a = ap.parse_args(argv)
    from .controls import parse_pairs
    try:
        fold, contrast = parse_pairs(a.fold, "--fold"), parse_pairs(a.control, "--control")
        depth = {k: int(v) for k, v in parse_pairs(a.depth, "--depth").items()}
    except ValueError as e:
        ap.error(str(e))
    if a.markdown_only:
        rec = os.path.join(a.out, "recurrence.csv")
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(markdown(json.load(open(os.path.join(a.out, "fit.json"))),
                             pd.read_csv(os.path.join(a.out, "fit_table.csv")),
                             pd.read_csv(os.path.join(a.out, "test_time.csv")),
                             pd.read_csv(rec) if os.path.isfile(rec) else None, a.wall,
                             json.load(open(ctl)) if os.path.isfile(ctl := os.path.join(a.out, "controls.json"))
                             else None))
        return 0
    print(json.dumps(build(a.sweep_dir, a.out, a.bootstrap, a.wall, not a.no_recurrence, fold, contrast, depth)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
