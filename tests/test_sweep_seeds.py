"""Seeds and controls in sweep specs: one run per seed with its own train.seed, seed-major plan
order, fixed-width depth controls, r = 1 cells shared by a probe (`r1_from`), and the seed and
n_adapter columns of `sweep collect`'s table."""
import csv
import json
import os

import pytest

from megaloop.accounting import count_params, injection_params
from megaloop.cli import main
from megaloop.config import ConfigError, load_config
from megaloop.sweep.collect import collect
from megaloop.sweep.plan import expand, write_plan
from megaloop.sweep.spec import parse_sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(**top):
    data = {"name": "seeded", "base": {"model": {"vocab_size": 320, "seq_len": 32}, "train": {"micro_batch_size": 4}},
            "grid": dict(head_dim=16, n_prelude=1, n_coda=1, total_recur_depth=2, r=[1, 2], width_multiple=16,
                         round_to=16, input_injection_r1=None,
                         budgets=[{"flops": 3e8, "sizes": [2], "seeds": [5, 6, 7]}, {"flops": 6e8, "sizes": [2]}])}
    data.update(top)
    return data


def test_seeds_make_one_run_per_cell_and_seed_in_seed_major_order(tmp_path):
    """Contract: every cell is planned once per seed of its budget (the budget's own seeds, else the
    sweep's), the seed lands in train.seed (initialisation and data order) and in the manifest, run
    names tell seeds apart, and the manifest lists whole replicates first seed first, cheapest budget up."""
    spec = parse_sweep(_sweep(seeds=[5, 6]))
    runs = expand(spec, str(tmp_path))
    cells = {}
    for run in runs:
        cells.setdefault((run.r, run.target_flops), []).append(run.seed)
        assert run.cfg.train.seed == run.seed and run.run.endswith(f"_seed{run.seed}")
    assert cells == {(1, 3e8): [5, 6, 7], (2, 3e8): [5, 6, 7], (1, 6e8): [5, 6], (2, 6e8): [5, 6]}
    order = [(run.seed, run.target_flops) for run in runs]
    assert order == [(5, 3e8)] * 2 + [(5, 6e8)] * 2 + [(6, 3e8)] * 2 + [(6, 6e8)] * 2 + [(7, 3e8)] * 2
    manifest = write_plan(spec, runs, str(tmp_path))
    assert [row["seed"] for row in manifest["runs"]] == [run.seed for run in runs]
    assert load_config(os.path.join(tmp_path, runs[-1].config)).train.seed == 7


def test_without_seeds_names_and_order_are_unchanged(tmp_path):
    """Contract: a sweep without seeds plans as before: one run per cell at base train.seed, names
    without a seed, variant-major order."""
    data = _sweep()
    for b in data["grid"]["budgets"]:
        b.pop("seeds", None)
    runs = expand(parse_sweep(data), str(tmp_path))
    assert [r.run for r in runs] == ["baseline_r1_s2_c3e8", "baseline_r1_s2_c6e8", "baseline_r2_s2_c3e8",
                                     "baseline_r2_s2_c6e8"]
    assert {r.seed for r in runs} == {1337}


def test_depth_controls_and_r1_from(tmp_path):
    """Contract: `recur_blocks: k` plans an r = 1 model with k unique recurrent blocks at the grid's
    widths (fewer parameters, so more tokens for the same budget); `r1_from: V` plans no r = 1 runs of
    its own and records V as the source of its r = 1 cells."""
    data = _sweep(seeds=[5], variants={"baseline": {}, "depth1": {"r": [1], "recur_blocks": 1},
                                       "trunc": {"bptt_k": 1, "r": [2], "r1_from": "baseline"}})
    data["grid"]["total_recur_depth"] = 2
    spec = parse_sweep(data)
    runs = expand(spec, str(tmp_path))
    depth = [r for r in runs if r.variant == "depth1"]
    base1 = [r for r in runs if r.variant == "baseline" and r.r == 1]
    assert depth and all(r.n_recur_block == 1 and r.r == 1 for r in depth)
    for d, b in zip(depth, base1):
        assert d.d_model == b.d_model and d.n_rec < b.n_rec and d.tokens > b.tokens
        assert d.n_rec == count_params(d.cfg.model).n_rec
    assert {r.r for r in runs if r.variant == "trunc"} == {2}
    manifest = write_plan(spec, runs, str(tmp_path))
    assert manifest["r1_controls"] == {"trunc": "baseline"}


@pytest.mark.parametrize("variants, message", [
    ({"d": {"r": [1, 2], "recur_blocks": 1}}, "a depth control is an r = 1 model"),
    ({"d": {"r": [1], "recur_blocks": 2}}, "fewer unique recurrent blocks than the grid (1 .. 1)"),
    ({"p": {"r": [2], "r1_from": "nobody"}}, "'nobody' is not another variant"),
    ({"p": {"r": [1, 2], "r1_from": "baseline"}, "baseline": {}}, "its own r must not include 1"),
    ({"p": {"r": [2], "r1_from": "q"}, "q": {"r": [2]}}, "variant 'q' has no r = 1 runs"),
])
def test_bad_controls_fail_clearly(variants, message):
    """Contract: a depth control that is not r = 1 or not shallower than the grid, and an r1_from that
    names no variant, a variant without r = 1 runs, or overlaps the probe's own r, are one ConfigError."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sweep(_sweep(variants=variants))


def test_bad_seeds_fail_clearly():
    """Contract: repeated or negative seeds, and budgets of which only some list seeds (with no
    sweep-level seeds for the rest), are refused before planning."""
    with pytest.raises(ConfigError, match="a seed is listed twice"):
        parse_sweep(_sweep(seeds=[1, 1]))
    with pytest.raises(ConfigError, match="seeds must be >= 0"):
        parse_sweep(_sweep(seeds=[-1]))
    with pytest.raises(ConfigError, match="budget 6e\\+08 does not"):
        parse_sweep(_sweep())


def _fake_summary(run_dir, loss):
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"val_loss": loss, "unigram_entropy": 9.0}, f)


def test_collect_writes_seed_and_adapter_and_shares_r1_cells(tmp_path, capsys):
    """Contract: the fit table has one row per seed with its `seed` and the adapter's parameter count
    `n_adapter` (2 d^2 for the linear adapter, 0 without), and a variant planned with `r1_from: V` gets
    V's r = 1 rows again under its own name (same run, same loss); `megaloop sweep collect` runs."""
    data = _sweep(seeds=[5, 6], variants={"baseline": {}, "trunc": {"bptt_k": 1, "r": [2], "r1_from": "baseline"},
                                          "plain": {"r": [1], "input_injection": "passthrough"}})
    spec = parse_sweep(data)
    runs = expand(spec, str(tmp_path))
    write_plan(spec, runs, str(tmp_path))
    for i, run in enumerate(runs):
        _fake_summary(os.path.join(tmp_path, "runs", run.run), 4.0 + 0.01 * i)
    assert main(["sweep", "collect", str(tmp_path)]) == 0
    with open(tmp_path / "fit_table.csv") as f:
        rows = list(csv.DictReader(f))
    by_run = {run.run: run for run in runs}
    own = [r for r in rows if r["variant"] == by_run[r["run"]].variant]
    assert len(own) == len(runs)
    for row in own:
        run = by_run[row["run"]]
        assert int(row["seed"]) == run.seed
        assert int(row["n_adapter"]) == (injection_params(run.cfg.model) if run.input_injection == "linear" else 0)
        if run.variant == "plain":
            assert int(row["n_adapter"]) == 0
    shared = [r for r in rows if r["variant"] == "trunc" and r["r"] == "1"]
    base1 = [r for r in rows if r["variant"] == "baseline" and r["r"] == "1"]
    assert shared and [(r["run"], r["loss"], r["seed"]) for r in shared] == \
        [(r["run"], r["loss"], r["seed"]) for r in base1]
    c = collect(str(tmp_path))
    assert c.n_rows == len(rows)


def test_study2_spec_plans_its_design(tmp_path):
    """Contract: configs/sweeps/cpu_study2.yaml plans the design docs/results.md describes: every
    variant at r = 1, 2, 4 on every budget (probes' r = 1 from the baseline or their own lanes), 3 seeds
    at the lowest budget and 2 elsewhere, depth controls with 1 and 2 blocks, within 3.5e14 FLOPs."""
    from megaloop.sweep.spec import load_sweep
    spec = load_sweep(os.path.join(REPO, "configs", "sweeps", "cpu_study2.yaml"))
    runs = expand(spec, str(tmp_path))
    budgets = sorted({r.target_flops for r in runs})
    seeds = {b: {r.seed for r in runs if r.target_flops == b} for b in budgets}
    assert [len(seeds[b]) for b in budgets] == [3, 2, 2]
    for v in ("baseline", "hyperconnect"):
        assert {(r.r, r.target_flops) for r in runs if r.variant == v} == {(r, b) for r in (1, 2, 4) for b in budgets}
    for v in ("truncbptt", "randdepth"):
        assert {(r.r, r.target_flops) for r in runs if r.variant == v} == {(r, b) for r in (2, 4) for b in budgets}
    assert spec.variants[[v.name for v in spec.variants].index("truncbptt")].r1_from == "baseline"
    assert {r.n_recur_block for r in runs if r.variant.startswith("depth")} == {1, 2}
    assert sum(r.target_flops for r in runs) <= 3.5e14
