"""`megaloop fit` end to end through a subprocess: JSON contract, text output, plots, --help."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from megaloop.analysis.make_example import synthetic_table

REPO = Path(__file__).resolve().parents[1]
KEYS = ["phi", "phi_ci", "E", "E_ci", "A", "A_ci", "alpha", "alpha_ci", "B", "B_ci", "beta", "beta_ci",
        "n_runs", "huber_delta", "objective", "r2", "rmse_log", "isoflop",
        "profile_ci", "at_bound", "identified", "holdout", "diverged", "excluded"]
PARAMS = ["phi", "E", "A", "alpha", "B", "beta"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaloop.analysis.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the fit CLI in a subprocess with a bootstrap and plots
def test_fit_json_and_plots_end_to_end(tmp_path):
    """fit --json on a variant table prints one JSON object with the contract keys, per-variant
    fits with dphi intervals and the iso-FLOP frontier (the joint fit is tested in-process);
    --plots writes PNG + PDF."""
    a = synthetic_table(1, rs=(1, 4))
    b = synthetic_table(2, rs=(1, 4), params={"phi": 0.65})
    b["run"] = "hc_" + b["run"]
    df = pd.concat([a.assign(variant="baseline"), b.assign(variant="hyperconnect")])
    csv = tmp_path / "t.csv"
    df.to_csv(csv, index=False)
    p = _run("fit", str(csv), "--json", "--bootstrap", "30", "--seed", "1",
             "--plots", str(tmp_path / "plots"))
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert all(k in rep for k in KEYS)
    for v, d in rep["variants"].items():  # the diagnostics are there per variant too
        assert all(k in d for k in KEYS if k != "isoflop"), v
        assert set(d["profile_ci"]) == set(d["identified"]) == set(PARAMS)
        assert d["profile_ci"]["phi"][0] < d["phi"] < d["profile_ci"]["phi"][1] and d["at_bound"] == []
        assert set(d["holdout"]) >= {"budget", "n_runs", "rmse_log", "max_abs_log"}
        assert d["holdout"]["budget"] == 2.15e19 and d["holdout"]["rmse_log"] < 0.02
    assert rep["n_runs"] == 58 and rep["huber_delta"] == 1e-3 and len(rep["phi_ci"]) == 2
    assert set(rep["variants"]) == {"baseline", "hyperconnect"}
    assert rep["variants"]["hyperconnect"]["dphi"] > 0.05 and len(rep["variants"]["hyperconnect"]["dphi_ci"]) == 2
    assert rep["isoflop"]["frontier"]
    names = {Path(f).name for f in rep["plots"]}
    for stem in ("law", "isoflop", "phi_bootstrap", "residuals"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (tmp_path / "plots" / f"{stem}.png").stat().st_size > 1000


@pytest.mark.slow  # the fit CLI in subprocesses
def test_fit_text_output_and_errors(tmp_path):
    """Default output is human-readable with phi, its interval and the goodness of fit; an
    n_rec = 0 table says phi is not identifiable, in the one phi line too; --keep-diverged is
    accepted with a one-line notice (keeping every run is the default now) and --drop-outliers
    drops the run far from the fit; a bad table exits 2 with no traceback."""
    df = synthetic_table(3, rs=(1,))
    df["n_rec"] = 0.0
    df.loc[5, "loss"] *= 1.3
    csv = tmp_path / "c.csv"
    df.to_csv(csv, index=False)
    p = _run("fit", str(csv), "--bootstrap", "10", "--keep-diverged")
    assert p.returncode == 0, p.stderr
    assert "phi   = not identifiable" in p.stdout and "R^2(loss)=" in p.stdout and "iso-FLOP" in p.stdout
    assert "  phi NOT identified: every run has r = 1 or n_rec = 0" in p.stdout
    assert "kept (--drop-outliers drops it)" in p.stdout and "n_runs=29" in p.stdout
    assert p.stderr.count("\n") == 1 and "--keep-diverged does nothing" in p.stderr
    p = _run("fit", str(csv), "--bootstrap", "0", "--drop-outliers", "--json")
    rep = json.loads(p.stdout)
    assert rep["n_runs"] == 28 and rep["diverged"][0]["run"] == df.run[5] and rep["diverged"][0]["dropped"]
    df = df.astype({"loss": object})
    df.loc[4, "loss"] = "oops"
    df.to_csv(csv, index=False)
    p = _run("fit", str(csv))
    assert p.returncode == 2 and "row 5" in p.stderr and "Traceback" not in p.stderr


def test_help():
    """--help works for both subcommands and names the programs."""
    for cmd, prog in (("fit", "megaloop fit"), ("capacity", "megaloop capacity")):
        p = _run(cmd, "--help")
        assert p.returncode == 0 and f"usage: {prog}" in p.stdout
