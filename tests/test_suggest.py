"""`megaloop sweep suggest` and its criterion (analysis/design.py): greedy c-optimal design of the
next runs under the fitted law, on synthetic tables drawn from a known law."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from megaloop.analysis import design
from megaloop.analysis.law import LawData, predict_log_loss
from megaloop.errors import UserError
from megaloop.sweep.suggest import Target, candidate_frame, load_candidates, suggest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISO = os.path.join(ROOT, "configs", "sweeps", "iso_depth.yaml")


@pytest.fixture(scope="module")
def iso():
    spec, runs = load_candidates(ISO)
    return spec, runs, candidate_frame(runs)


def synthetic(cand: pd.DataFrame, mask, noise=0.003, seed=0, phi=0.459) -> pd.DataFrame:
    """Runs of the candidate grid with losses from the reference law plus Gaussian log-loss noise."""
    sel = cand[mask].reset_index(drop=True)
    d = LawData.build(sel.n_once, sel.n_rec, sel.r, sel.tokens, np.ones(len(sel)))
    rng = np.random.default_rng(seed)
    sel = sel.assign(loss=np.exp(predict_log_loss(design.reference_raw(phi), d) + rng.normal(0, noise, len(sel))))
    return sel[["run", "variant", "n_once", "n_rec", "r", "tokens", "loss"]]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megaloop.cli", "sweep", "suggest", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


# ------------------------------------------------------------------------------------ criterion

def test_reductions_match_a_fresh_inverse():
    """The Sherman-Morrison variance drop of each candidate equals c' I^-1 c recomputed from scratch
    with that candidate's information added (independent reference: a direct inverse)."""
    rng = np.random.default_rng(1)
    J_tab, J = rng.normal(size=(12, 6)), rng.normal(size=(7, 6))
    c = design.contrast(1, 0)
    st = design.DesignState.start(J_tab, c, 0.01 ** 2)
    before = c @ np.linalg.inv(st.info) @ c
    for j in range(len(J)):
        after = c @ np.linalg.inv(st.info + np.outer(J[j], J[j]) / 0.01 ** 2) @ c
        assert st.reductions(J)[j] == pytest.approx(before - after, rel=1e-8)


def test_greedy_picks_the_largest_reduction_per_flop():
    """Each greedy pick is the brute-force argmax of (variance drop) / cost among what is affordable."""
    rng = np.random.default_rng(2)
    J_tab, J = rng.normal(size=(10, 6)), rng.normal(size=(9, 6))
    flops = rng.uniform(1, 5, size=9)
    st = design.DesignState.start(J_tab, design.contrast(1, 0), 0.02 ** 2)
    ref = design.DesignState(st.info.copy(), st.c, st.sigma2)
    res = design.greedy(st, J, design.plain_cost(flops), flops_budget=8.0)
    avail, spent = list(range(9)), 0.0
    for p in res.picks:
        v0 = ref.variance()
        score = {j: (v0 - design.DesignState(ref.info + np.outer(J[j], J[j]) / ref.sigma2, ref.c, ref.sigma2).variance())
                 / flops[j] for j in avail if flops[j] <= 8.0 - spent}
        assert p.index == max(score, key=score.get)
        ref.add(J[p.index])
        avail.remove(p.index)
        spent += flops[p.index]
    assert res.spent == pytest.approx(spent) and spent <= 8.0


def test_huber_variance_factor_limits():
    """Huber's asymptotic variance ratio: pi/2 (the median) as delta/sigma -> 0, 1 (least squares)
    as delta/sigma -> inf, and the Monte-Carlo value of E[psi^2]/E[psi']^2 in between."""
    assert design.huber_variance_factor(1.0, 1e-6) == pytest.approx(math.pi / 2, rel=1e-4)
    assert design.huber_variance_factor(1.0, 50.0) == pytest.approx(1.0, rel=1e-6)
    z = np.random.default_rng(0).normal(size=2_000_000)
    k = 0.7
    mc = np.mean(np.clip(z, -k, k) ** 2) / np.mean(np.abs(z) < k) ** 2
    assert design.huber_variance_factor(1.0, k) == pytest.approx(mc, rel=5e-3)


def test_jacobian_matches_the_analytic_phi_derivative():
    """d log L / d phi from the finite differences equals the closed form
    -alpha * A N_eff^-alpha / L * r^phi log r N_rec / N_eff."""
    raw = design.reference_raw()
    n_once, n_rec, r, tokens = np.array([2e7, 5e7]), np.array([8e7, 3e7]), np.array([4.0, 2.0]), np.array([1e9, 3e9])
    J = design.jacobian(raw, n_once, n_rec, r, tokens)
    A, B, E, alpha, beta, phi = math.exp(raw[0]), math.exp(raw[1]), math.exp(raw[2]), raw[3], raw[4], raw[5]
    n_eff = n_once + r ** phi * n_rec
    L = E + A * n_eff ** -alpha + B * tokens ** -beta
    want = -alpha * A * n_eff ** -alpha / L * r ** phi * np.log(r) * n_rec / n_eff
    assert J[:, 5] == pytest.approx(want, rel=1e-6)


def test_branched_cost_and_spent():
    """Under branching a group's largest run is the trunk (full FLOPs), the smaller ones cost their
    decay only; a run above an existing trunk is a new trunk."""
    flops = np.array([1.0, 2.0, 4.0, 1.0])
    group = ["g", "g", "g", "h"]
    spent, trained = design.spent_branched(flops, group, 0.2, [[0, 1], [3]])
    assert spent == pytest.approx(2.0 + 0.2 * 1.0 + 1.0)
    spent2, _ = design.spent_branched(flops, group, 0.2, [[2]], trained)
    assert spent2 == pytest.approx(4.0)
    cost = design.branched_cost(flops, group, 0.2, {"g": 4.0})
    assert cost([], 1) == pytest.approx(0.4) and cost([], 3) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ suggest

def test_proposes_r_contrasts_where_the_table_has_none(iso):
    """A table with r = 1 and 2 at the cheapest budget and only r = 1 at the next two: the first
    suggested runs are looped (r > 1) r-contrasts, and the expected width falls with every run."""
    spec, runs, cand = iso
    b = sorted(cand.budget.unique())
    df = synthetic(cand, ((cand.budget == b[0]) & cand.r.isin([1, 2])) | (cand.budget.isin(b[1:3]) & (cand.r == 1)))
    s = suggest(df, spec, runs, 4e18, Target.parse("phi"))
    assert s["runs"], s
    assert all(r["r"] > 1 for r in s["runs"][:3])
    widths = [s["width_now"]] + [r["width_after"] for r in s["runs"]]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert s["flops_spent"] <= 4e18
    assert not ({r["run"] for r in s["runs"]} & set(df["run"]))  # nothing the table holds already


def test_seed_design_without_a_table(iso):
    """No table: every r at the smallest and largest size of the two cheapest budgets, cheapest
    first, truncated to the FLOPs."""
    spec, runs, cand = iso
    s = suggest(None, spec, runs, 1.2e19, Target.parse("phi"))
    assert s["seed_design"]
    got = {(r["r"], r["size"], r["budget"]) for r in s["runs"]}
    assert got == {(r, s_, b) for r in (1, 2, 4, 8) for s_, b in ((6, 4.64e17), (12, 4.64e17), (6, 1e18), (14, 1e18))}
    small = suggest(None, spec, runs, 2e18, Target.parse("phi"))
    assert [r["budget"] for r in small["runs"]] == [4.64e17] * 4


def test_cli_json_and_out_plan_append(iso, tmp_path):
    """--json prints a list of runs with the contract's fields; --out writes a sweep file that
    `sweep plan --append` plans into an existing sweep directory as exactly those runs."""
    spec, runs, cand = iso
    b = sorted(cand.budget.unique())
    df = synthetic(cand, cand.budget.isin(b[:2]) & cand["size"].isin([6, 12, 14]))
    table = tmp_path / "t.csv"
    df.to_csv(table, index=False)
    out = tmp_path / "next.yaml"
    p = run_cli(str(table), "--candidates", ISO, "--flops", "3e18", "--json", "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert rows and isinstance(rows, list)
    for key in ("variant", "r", "size", "budget", "n_once", "n_rec", "tokens", "flops", "width_after", "model"):
        assert key in rows[0]
    sweep = tmp_path / "sweep"
    seed = tmp_path / "seed.yaml"
    data = yaml.safe_load(open(ISO))
    data["grid"]["budgets"] = data["grid"]["budgets"][:1]
    seed.write_text(yaml.safe_dump(data))
    q = subprocess.run([sys.executable, "-m", "megaloop.cli", "sweep", "plan", str(seed), "--out", str(sweep)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert q.returncode == 0, q.stderr
    q = subprocess.run([sys.executable, "-m", "megaloop.cli", "sweep", "plan", str(out), "--out", str(sweep),
                        "--append"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert q.returncode == 0, q.stderr
    manifest = json.load(open(sweep / "manifest.json"))
    names = {r["run"] for r in manifest["runs"]}
    assert {r["run"] for r in rows} <= names
    assert len(names) == 16 + len({r["run"] for r in rows} - {r for r in names if "c4.64e17" in r})


@pytest.mark.parametrize("case", ["variant", "no_loop", "flops", "one_r", "target"])
def test_bad_input(iso, tmp_path, case):
    """Each mistake is one clear error with exit status 2 (no traceback)."""
    spec, runs, cand = iso
    b = sorted(cand.budget.unique())
    df = synthetic(cand, cand.budget.isin(b[:2]) & cand["size"].isin([6, 12, 14]))
    args = ["--candidates", ISO, "--flops", "3e18"]
    want = None
    if case == "variant":
        args += ["--target", "dphi:hyperconnect"]
        want = "no runs of variant 'hyperconnect'"
    elif case == "no_loop":
        data = yaml.safe_load(open(ISO))
        data["grid"]["r"] = [1]
        path = tmp_path / "r1.yaml"
        path.write_text(yaml.safe_dump(data))
        args[1] = str(path)
        want = "no candidate run has r > 1"
    elif case == "flops":
        args[3] = "1e17"
        want = "below the cheapest candidate"
    elif case == "one_r":
        df = df[df.r == 4]
        want = "cannot identify phi"
    elif case == "target":
        args += ["--target", "psi"]
        want = "--target 'psi'"
    table = tmp_path / "t.csv"
    df.to_csv(table, index=False)
    p = run_cli(str(table), *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert want in p.stderr and "Traceback" not in p.stderr


def test_errors_are_user_errors(iso):
    """The library raises UserError (what the CLI prints as one line) for a bad target."""
    spec, runs, cand = iso
    with pytest.raises(UserError):
        Target.parse("dphi:")


def test_dphi_target_uses_the_joint_fit(tmp_path):
    """--target dphi:V: the joint fit of the baseline and V; the suggested runs lower the linearised
    width of phi_V - phi_baseline run by run, and include runs of V (its own phi needs its own runs)."""
    data = yaml.safe_load(open(ISO))
    data["grid"]["budgets"] = data["grid"]["budgets"][:3]
    data["variants"] = {"baseline": {}, "hyperconnect": {"input_injection": "hyperconnect", "num_lanes": 2}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    spec, runs = load_candidates(str(path))
    cand = candidate_frame(runs)
    b = sorted(cand.budget.unique())
    parts = []
    for v, phi in (("baseline", 0.46), ("hyperconnect", 0.65)):
        parts.append(synthetic(cand, (cand.variant == v) & cand.budget.isin(b[:2]) & cand["size"].isin([6, 10, 12, 14]),
                               phi=phi, seed=len(parts)).assign(variant=v))
    df = pd.concat(parts, ignore_index=True)
    s = suggest(df, spec, runs, 5e18, Target.parse("dphi:hyperconnect"))
    assert s["target"] == "dphi:hyperconnect" and s["runs"]
    widths = [s["width_now"]] + [r["width_after"] for r in s["runs"]]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert any(r["variant"] == "hyperconnect" for r in s["runs"])
    assert abs(s["estimate"] - 0.19) < 0.3
