"""Build analysis/notebooks/scaling_law.ipynb (unexecuted) with nbformat.

Run: python analysis/notebooks/make_notebook.py   (tests execute the notebook with nbclient)
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Looped scaling law: the whole analysis on the bundled example

`L = E + A (N_once + r^phi N_rec)^-alpha + B D^-beta`

The table `analysis/example_runs.csv` is **synthetic**: the reference study's fitted law
(E=1.56773, A=28.027, alpha=0.19924, B=915.82, beta=0.36863, phi=0.46) evaluated on the
reference iso-depth grid (116 runs: r in {1,2,4,8}, six budgets) with 0.5 % lognormal noise
(see `analysis/make_example.py`). Swap in a real sweep with `load_table(["runs/"])`."""),
    ("code", """import time
from pathlib import Path
import pandas as pd
import megaloop.analysis as ma
from megaloop.analysis.table import load_table
from megaloop.analysis.analyse import analyse
from megaloop.analysis.report import format_report
from megaloop.analysis.make_example import REFERENCE

table = Path(ma.__file__).parent / "example_runs.csv"
df = load_table([table])
df.groupby("r").size()"""),
    ("md", "## Fit (Huber on log loss, summed; grid-started batched L-BFGS; 95 % bootstrap and profile intervals)"),
    ("code", """t0 = time.perf_counter()
report, fits = analyse(df, delta=1e-3, n_boot=100, seed=0)
print(f"fit + bootstrap + iso-FLOP: {time.perf_counter() - t0:.1f} s")
print(format_report(report))"""),
    ("md", """## What the data identify

Each parameter's 95 % profile-likelihood interval beside its bootstrap interval, whether it ended on
a bound of its search region, and whether it is identified (the estimate inside the region and the
profile interval closed on both sides). The hold-out refits without the largest budget and
predicts it."""),
    ("code", """rows = []
for k in ("phi", "E", "A", "alpha", "B", "beta"):
    rows.append({"parameter": k, "estimate": report[k] if k != "phi" else report["phi_estimate"],
                 "bootstrap": report[k + "_ci"], "profile": report["profile_ci"][k],
                 "at bound": k in report["at_bound"], "identified": report["identified"][k],
                 "why not": report["not_identified_because"].get(k, "")})
ho = report["holdout"]
print(f"hold-out: {ho['n_runs']} runs at C={ho['budget']:.3g} predicted with RMSE(log loss) {ho['rmse_log']:.4f}")
pd.DataFrame(rows).set_index("parameter")"""),
    ("md", "## Against the truth that generated the table"),
    ("code", """rows = []
for k, truth in REFERENCE.items():
    ci, pci = report[k + "_ci"], report["profile_ci"][k]
    rows.append({"parameter": k, "truth": truth, "fit": report[k], "low": ci[0], "high": ci[1],
                 "profile covered": pci[0] <= truth <= pci[1], "covered": ci[0] <= truth <= ci[1]})
pd.DataFrame(rows).set_index("parameter").round(4)"""),
    ("md", "## Iso-FLOP frontier at r = 1 against the reference study's compute-optimal losses"),
    ("code", """ref = [2.852, 2.718, 2.605, 2.498, 2.401, 2.309]
r1 = next(f for f in report["isoflop"]["frontier"] if f["r"] == 1)
pd.DataFrame([{"budget": p["budget"], "N*": p["N_opt"], "L*": p["L_opt"]} for p in r1["points"]])"""),
    ("md", "## Figures"),
    ("code", """from IPython.display import Image, display
from megaloop.analysis.plots import make_plots
import tempfile
out = Path(tempfile.mkdtemp(prefix="megaloop_plots_"))
paths = make_plots(report, fits, df, out)
for p in paths:
    if p.endswith(".png"):
        display(Image(filename=p))"""),
    ("md", "## What a looped model is worth (capacity calculator)"),
    ("code", """from megaloop.analysis.capacity import Capacity
c = Capacity(n_once=213e6, n_rec=197e6, r=4, phi=report["phi"])
law = fits["all"].law_params()
print(f"unique-parameter equivalent: {c.unique_equivalent/1e6:.0f}M, compute equivalent: {c.compute_equivalent/1e6:.0f}M")
print(f"predicted loss at 20B tokens: {c.predicted_loss(law, 20e9):.4f}")"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    path = Path(__file__).with_name("scaling_law.ipynb")
    nbformat.write(build(), path)
    print(f"wrote {path}")
