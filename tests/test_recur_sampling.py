"""Randomized training depth (model.recur_sampling): the draw, its distribution and expected cost,
the training loop's record of it, resume, bad input, and the random-depth probe's sweep path.

The distribution is checked against Monte-Carlo counts over many draws, and against an
independent sampler that follows the contract's formula with numpy (tau ~ LogNormal(log(mean) -
sigma^2/2, sigma), r = Poisson(tau) + 1, clamped at the cap).
"""
import csv
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_raw
from test_divergence import fault_env  # noqa: F401 (the fault-injection fixture)
from megaloop import checkpoint as ckpt
from megaloop.accounting import (count_params, expected_flops_per_token, flops_per_token, model_param_groups,
                                 realised_flops, tokens_for_budget)
from megaloop.cli import main
from megaloop.config import load_config
from megaloop.depth import DepthSampler, law_recurrences
from megaloop.model import LoopedLM
from megaloop.parallel.dcp_state import read_weights
from megaloop.sweep.plan import expand, read_manifest
from megaloop.sweep.spec import load_sweep
from megaloop.train import plan_budget, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = os.path.join(REPO, "configs", "sweeps")
N_DRAWS = 20000


def model_cfg(sampling, **model):
    base = dict(d_model=32, n_head=2, vocab_size=64, seq_len=16, n_prelude=1, n_recur_block=1, n_coda=1,
                num_recur=4, recur_sampling=sampling)
    base.update(model)
    return load_config(raw={"model": base, "train": {"steps": 1}}).model


PL = dict(kind="poisson_lognormal", mean=3)
UNIFORM = dict(kind="uniform", lo=2, hi=6)


def test_draw_is_a_pure_function_of_seed_and_step():
    """Contract: the draw depends on (train.seed, step) only: two samplers agree, any step can be
    drawn alone (so a resumed run continues the sequence exactly), another seed gives another
    sequence, every draw lies in [min_r, max_r], and no global RNG (python, numpy, torch) moves."""
    cfg = model_cfg(PL)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a, b = DepthSampler(cfg, 7), DepthSampler(cfg, 7)
    seq = a.draws(1, 300)
    assert seq == b.draws(1, 300) and a.draw(123) == seq[122]
    assert seq != DepthSampler(cfg, 8).draws(1, 300)
    assert min(seq) >= a.min_r == 1 and max(seq) <= a.max_r == 12 and len(set(seq)) > 5
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    assert DepthSampler(model_cfg(dict(kind="fixed")), 7).draws(1, 5) == [4] * 5


def _within(freq: np.ndarray, p: np.ndarray, n: int, label: str) -> None:
    tol = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12
    bad = np.flatnonzero(np.abs(freq - p) > tol)
    assert bad.size == 0, f"{label}: P(r={bad[0]}) = {p[bad[0]]:.4f}, observed {freq[bad[0]]:.4f}"


@pytest.mark.parametrize("sampling", [PL, dict(kind="poisson_lognormal", mean=2.5, sigma=1.0, cap=5), UNIFORM])
def test_distribution_matches_monte_carlo_and_the_formula(sampling):
    """Contract: over 20,000 draws, the frequency of every r matches the exact P(r) used for the
    accounting (within 4.5 standard errors), nothing is drawn outside the support; for
    poisson_lognormal an independent numpy sampler of the contract's formula (clamped at the cap)
    matches the same P(r), and without a binding cap E[r] = mean + 1."""
    cfg = model_cfg(sampling)
    d = DepthSampler(cfg, 11)
    draws = np.array(d.draws(1, N_DRAWS))
    p = d.pmf()
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and draws.min() >= d.min_r and draws.max() <= d.max_r
    _within(np.bincount(draws, minlength=p.size) / N_DRAWS, p, N_DRAWS, "megaloop sampler")
    if sampling["kind"] == "poisson_lognormal":
        rng = np.random.default_rng(0)
        sigma = sampling.get("sigma", 0.5)
        tau = rng.lognormal(math.log(sampling["mean"]) - sigma ** 2 / 2, sigma, N_DRAWS)
        ref = np.minimum(rng.poisson(tau) + 1, d.max_r)
        _within(np.bincount(ref, minlength=p.size) / N_DRAWS, p, N_DRAWS, "numpy reference")
        wide = DepthSampler(model_cfg(dict(sampling, cap=2000)), 0)  # no binding cap
        assert wide.expected_r() == pytest.approx(sampling["mean"] + 1, abs=1e-6)
    else:
        assert d.expected_r() == pytest.approx((sampling["lo"] + sampling["hi"]) / 2)


def test_expected_flops_and_budgets_hold_in_expectation():
    """Contract: FLOPs per token of a sampled depth are the expectation over the distribution
    (checked against the mean of DESIGN.md's per-r count over 20,000 draws, with truncated
    backprop so the count is not linear in r); count_params reports it; a target_flops budget
    buys budget / E[FLOPs per token] tokens, so the FLOPs actually spent over the run's draws
    (realised_flops) come within Monte-Carlo error of the budget; with a curriculum the ramp's
    cheaper steps buy more tokens and the realised FLOPs still match the budget."""
    cfg = model_cfg(PL, bptt_k=2)
    d = DepthSampler(cfg, 3)
    draws = d.draws(1, N_DRAWS)
    per = np.array([flops_per_token(cfg, r) for r in draws])
    expected = expected_flops_per_token(cfg)
    assert abs(per.mean() - expected) <= 4 * per.std() / math.sqrt(N_DRAWS)
    assert count_params(cfg).flops_per_token == expected
    assert expected != flops_per_token(cfg, 4)
    tps = 64
    budget = expected * tps * N_DRAWS
    assert tokens_for_budget(cfg, budget, tps) == pytest.approx(tps * N_DRAWS)
    spent = realised_flops(cfg, draws, tps)
    assert abs(spent - budget) <= 4 * per.std() * tps * math.sqrt(N_DRAWS)

    ramp = model_cfg(dict(PL, curriculum_steps=2000), bptt_k=2)
    tokens = tokens_for_budget(ramp, budget, tps)
    assert tokens > tps * N_DRAWS
    steps = int(tokens // tps)
    spent = realised_flops(ramp, DepthSampler(ramp, 3).draws(1, steps), tps)
    assert abs(spent - budget) <= 4 * per.std() * tps * math.sqrt(steps) + expected * tps
    raw = {"model": dict(d_model=32, n_head=2, vocab_size=64, seq_len=16, n_prelude=1, n_recur_block=1, n_coda=1,
                         num_recur=4, bptt_k=2, recur_sampling=dict(PL, curriculum_steps=2000)),
           "train": {"target_flops": budget, "micro_batch_size": 4}}
    assert plan_budget(load_config(raw=raw), expected, 1).steps == steps


def test_curriculum_ramps_as_documented():
    """Contract (megaloop/depth.py): with curriculum_steps C, step s uses p = min(1, s / C):
    poisson_lognormal's rate has mean p * mean, so E[r] = 1 + p * mean (no binding cap) and the
    draws of the ramp average that; uniform draws from lo..lo + ceil(p (hi - lo)); from step C on
    the distribution is the stationary one."""
    C = 400
    cfg = model_cfg(dict(PL, cap=60, curriculum_steps=C))
    d = DepthSampler(cfg, 5)
    for s in (1, 100, 200, 399):
        assert d.expected_r(s) == pytest.approx(1 + 3 * s / C, abs=1e-6)
    assert np.array_equal(d.pmf(C), d.pmf()) and np.array_equal(d.pmf(5 * C), d.pmf())
    ramp = np.array(d.draws(1, C))
    target = np.mean([d.expected_r(s) for s in range(1, C + 1)])
    assert abs(ramp.mean() - target) <= 4 * ramp.std() / math.sqrt(C)
    assert ramp[: C // 4].mean() < ramp[-C // 4:].mean()
    u = DepthSampler(model_cfg(dict(UNIFORM, curriculum_steps=8)), 5)
    for s in range(1, 12):
        hi = 2 + math.ceil(min(1, s / 8) * 4)
        assert set(np.flatnonzero(u.pmf(s))) == set(range(2, hi + 1))
        assert 2 <= u.draw(s) <= hi


def test_hyperconnect_has_one_parameter_set_per_drawable_depth():
    """Contract: hyperconnect sizes its per-recurrence alpha, M, beta by the deepest draw (the
    uniform hi or the poisson_lognormal cap), so every training pass has its own; the hand count
    equals the built model."""
    cfg = model_cfg(dict(kind="uniform", lo=1, hi=6), input_injection="hyperconnect", num_lanes=2)
    model = LoopedLM(cfg)
    assert model.injection.alpha.shape == (6, 2) and cfg.max_recur == 6
    counts, built = count_params(cfg), model_param_groups(model)
    assert all(getattr(counts, k) == v for k, v in built.items())


def test_hf_export_of_a_sampled_hyperconnect_model_matches():
    """Contract: the transformers export of a sampled-depth hyperconnect model declares as many
    per-recurrence parameter sets as it trained (the deepest draw, not num_recur), so its weights
    load strictly and its logits equal megaloop's at the evaluated r and past the cap."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from megaloop.config import Config
    from megaloop.inference.hf_export import hf_config
    from megaloop.inference.hf_modeling.configuration_megaloop import MegaloopConfig
    from megaloop.inference.hf_modeling.modeling_megaloop import MegaloopForCausalLM
    cfg = Config(model=model_cfg(dict(kind="poisson_lognormal", mean=2, cap=5), input_injection="hyperconnect",
                                 num_lanes=2, num_recur=3))
    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    with torch.no_grad():
        for p in model.parameters():  # off the identity-like init, so every lane parameter matters
            p.add_(0.05 * torch.randn_like(p))
    spec = {k: v for k, v in hf_config(cfg, SimpleNamespace(eos_id=0)).items()
            if k not in ("architectures", "model_type", "auto_map")}
    hf = MegaloopForCausalLM(MegaloopConfig(**spec))
    hf.load_state_dict(model.state_dict(), strict=True)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        for r in (3, 7):
            torch.testing.assert_close(hf(input_ids=x, num_recur=r).logits, model(x, num_recur=r), atol=1e-5, rtol=1e-5)


def test_truncated_backprop_applies_to_the_drawn_r():
    """Contract: a step that draws r with bptt_k = k differentiates the last min(k, r) passes: one
    single-process step of a sampled run at r = 3, k = 1 leaves the same weights as the fixed-r run
    at r = 3, k = 1 (and not those of full backprop at r = 3)."""
    from megaloop.parallel import local_engine

    def step(model_over, r=None):
        # additive injection couples the passes from the first step ([I | 0] decouples them at init)
        raw = {"model": dict(d_model=32, n_head=2, vocab_size=64, seq_len=16, n_prelude=1, n_recur_block=1,
                             n_coda=1, input_injection="additive", **model_over),
               "optim": {"name": "adamw", "lr": 0.01}, "train": {"steps": 1}}
        cfg = load_config(raw=raw)
        torch.manual_seed(0)
        eng = local_engine(cfg, LoopedLM(cfg.model), torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 64, (2, 16), generator=g)
        eng.train_step([(x, torch.roll(x, -1, 1))], 1.0, num_recur=r)
        return [p.detach().clone() for p in eng.model.parameters()]

    sampled = step(dict(num_recur=2, bptt_k=1, recur_sampling=dict(kind="uniform", lo=1, hi=4)), r=3)
    fixed = step(dict(num_recur=3, bptt_k=1))
    full = step(dict(num_recur=3))
    assert all(torch.equal(a, b) for a, b in zip(sampled, fixed))
    assert not all(torch.equal(a, b) for a, b in zip(sampled, full))


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_training_records_every_draw_and_resumes_bitwise(tiny_corpus, data_cache, tmp_path):
    """Contract: metrics.jsonl carries each logged step's draw as num_recur (and, with log_every >
    1, the draws of every step since the last record as num_recur_window), exactly the sampler's
    sequence; summary.json reports the histogram and mean of r, E[r] and the realised FLOPs; a run
    killed after a checkpoint and resumed draws the same r, loss for loss and weight for weight."""
    sampling = dict(kind="poisson_lognormal", mean=1.5)

    def raw(run):
        r = tiny_raw(tiny_corpus, data_cache, run, steps=8, save_every=3, log_every=2)
        r["model"]["recur_sampling"] = sampling
        return r

    full = str(tmp_path / "full")
    summary = train(load_config(raw=raw(full)), log=lambda *a: None)
    cfg = load_config(os.path.join(full, "config.yaml"))
    draws = DepthSampler(cfg.model, cfg.train.seed).draws(1, 8)
    assert len(set(draws)) > 1, draws
    m = [x for x in _metrics(full) if "loss" in x]
    assert [x["step"] for x in m] == [2, 4, 6, 8]
    assert [x["num_recur"] for x in m] == draws[1::2]
    assert [w for x in m for w in x["num_recur_window"]] == draws
    assert summary["r_hist"] == {str(r): n for r, n in sorted(Counter(draws).items())}
    assert summary["r_mean"] == pytest.approx(sum(draws) / 8) and summary["recur_sampling"] == "poisson_lognormal"
    assert summary["r_expected"] == pytest.approx(DepthSampler(cfg.model, 0).expected_r())
    tps = 4 * 32
    assert summary["flops"] == pytest.approx(sum(flops_per_token(cfg.model, r) * tps for r in draws))
    assert summary["flops_per_token"] == pytest.approx(expected_flops_per_token(cfg.model))

    part = str(tmp_path / "part")
    path = tmp_path / "part.yaml"
    path.write_text(yaml.safe_dump(raw(part)))
    env = dict(os.environ, MEGALOOP_FAULT="step:5")  # SIGKILL after step 5; the checkpoint of step 3 survives
    proc = subprocess.run([sys.executable, "-m", "megaloop.cli", "train", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    train(load_config(str(path)), resume=True, log=lambda *a: None)
    again = [x for x in _metrics(part) if "loss" in x]
    assert [x["loss"] for x in again] == [x["loss"] for x in m]
    assert [x["num_recur"] for x in again] == [x["num_recur"] for x in m]
    a, b = (read_weights(ckpt.latest_path(p)) for p in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_rewound_sampled_run_logs_each_kept_step_once(tiny_corpus, data_cache, tmp_path, fault_env):
    """Contract: a sampled-depth run that rewinds (train.on_divergence=rewind after an injected
    loss spike at step 7, back to the checkpoint at step 6) logs the draws of the steps it kept:
    across the records num_recur_window is the sampler's sequence 1..8 exactly once (the
    abandoned step's draw is not logged twice), and the re-run step 7 draws the same r."""
    fault_env("spike:7")
    run = str(tmp_path / "run")
    raw = tiny_raw(tiny_corpus, data_cache, run, steps=8, save_every=2, log_every=2, spike_window=3)
    raw["model"]["recur_sampling"] = dict(kind="poisson_lognormal", mean=1.5)
    summary = train(load_config(raw=raw), log=lambda *a: None)
    assert summary["rewinds"] == 1
    cfg = load_config(os.path.join(run, "config.yaml"))
    draws = DepthSampler(cfg.model, cfg.train.seed).draws(1, 8)
    assert len(set(draws)) > 1, draws
    m = [x for x in _metrics(run) if "loss" in x]
    assert [x["step"] for x in m] == [2, 4, 6, 8]
    assert [w for x in m for w in x.get("num_recur_window", [x["num_recur"]])] == draws
    assert [x["num_recur"] for x in m] == draws[1::2]


@pytest.mark.parametrize("sets, words", [
    (["model.recur_sampling.mean=0.5"], "mean must be >= 1"),
    (["model.recur_sampling.sigma=0"], "sigma must be > 0"),
    (["model.recur_sampling.sigma=-0.5"], "sigma must be > 0"),
    (["model.recur_sampling.kind=uniform", "model.recur_sampling.mean=null", "model.recur_sampling.lo=5",
      "model.recur_sampling.hi=3"], "lo=5 is above hi=3"),
    (["model.recur_sampling.kind=uniform", "model.recur_sampling.mean=null", "model.recur_sampling.lo=2",
      "model.recur_sampling.hi=5", "model.bptt_k=3"], "above the smallest draw lo=2"),
    (["model.bptt_k=7"], "above the deepest draw (6)"),
    (["model.input_injection=hyperconnect", "model.bptt_k=2"], "hyperconnect needs full backprop"),
    (["model.recur_sampling.kind=geometric"], "kind='geometric' is unknown"),
    (["model.recur_sampling.lo=2"], "lo is set but kind=poisson_lognormal does not use it"),
    (["model.recur_sampling.curriculum_steps=0"], "curriculum_steps must be >= 1"),
])
def test_bad_sampling_config_fails_before_training(tiny_corpus, data_cache, tmp_path, capsys, sets, words):
    """Contract: a mean below 1, a sigma at or below 0, lo > hi, a bptt_k above the smallest draw
    of a uniform depth (or above the deepest draw), truncated hyperconnect, an unknown kind and a
    key the kind does not use: `megaloop train` exits 2 with one line naming the problem, no
    traceback, and the run directory is never created."""
    run = tmp_path / "run"
    r = tiny_raw(tiny_corpus, data_cache, str(run), steps=2)
    r["model"]["recur_sampling"] = dict(kind="poisson_lognormal", mean=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(r))
    argv = ["train", str(path)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_params_prints_the_expected_figures(tmp_path, capsys):
    """Contract: `megaloop params` of a sampled depth prints E[r], its range, P(r) and the FLOPs
    per token in expectation; --json carries the same numbers (r_expected, r_pmf, flops_per_token,
    flops_per_token_by_r) and a budget's tokens = budget / E[FLOPs per token]."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": dict(num_recur=4, recur_sampling=PL), "train": {"steps": 1}}))
    assert main(["params", str(path), "--json", "--flops", "1e15"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = load_config(str(path)).model
    assert out["flops_per_token"] == pytest.approx(expected_flops_per_token(cfg))
    assert out["r_expected"] == pytest.approx(DepthSampler(cfg, 0).expected_r())
    assert (out["r_min"], out["r_max"]) == (1, 12) and sum(out["r_pmf"].values()) == pytest.approx(1.0)
    assert out["budget_tokens"] == int(1e15 / out["flops_per_token"])
    assert sum(out["r_pmf"][k] * out["flops_per_token_by_r"][k] for k in out["r_pmf"]) == \
        pytest.approx(out["flops_per_token"])
    assert main(["params", str(path)]) == 0
    text = capsys.readouterr().out
    assert "E[r]=3.983" in text and "FLOPs per token (training, E over r)" in text and "P(r): 1: 0.103" in text


def test_random_depth_probes_plan(tmp_path):
    """Contract: probe_random_depth.yaml is r in {2, 4, 8} x the four lower reference budgets (60
    runs) with poisson_lognormal depth whose mean is r - 1 (E[r] = r), each evaluated at its mean
    depth, twice it and the grid's r, and charged its expected FLOPs per token (tokens = budget /
    E[FLOPs per token]); it appends to the reference grid's folder. The CPU probe is the demo grid
    at r in {2, 4} (18 runs); with grid.test_time_recur its runs are also evaluated at r_test =
    1..k r. A `match_r` on a key it does not apply to is refused."""
    runs = expand(load_sweep(os.path.join(SWEEPS, "probe_random_depth.yaml")), str(tmp_path / "x"))
    assert len(runs) == 60 and {r.r for r in runs} == {2, 4, 8} and {r.variant for r in runs} == {"randdepth"}
    assert {r.target_flops for r in runs} == {4.64e17, 1e18, 2.15e18, 4.64e18}
    for run in runs:
        m = run.cfg.model
        assert m.recur_sampling.kind == "poisson_lognormal" and m.recur_sampling.mean == run.r - 1
        assert m.num_recur == run.r and m.bptt_k is None
        assert run.cfg.train.eval_recur == sorted({1, 2, 4, 8, run.r, 2 * run.r})
        assert run.cfg.train.eval_recur == law_recurrences(m, [1, 2, 4, 8])
        assert run.flops_per_token == expected_flops_per_token(m)
        assert run.tokens == math.floor(run.target_flops / run.flops_per_token)
    out = str(tmp_path / "iso")
    assert main(["sweep", "plan", os.path.join(SWEEPS, "iso_depth.yaml"), "--out", out]) == 0
    assert main(["sweep", "plan", os.path.join(SWEEPS, "probe_random_depth.yaml"), "--out", out, "--append"]) == 0
    assert len(read_manifest(out)["runs"]) == 176
    cpu = str(tmp_path / "cpu")
    assert main(["sweep", "plan", os.path.join(SWEEPS, "cpu_probe_random_depth.yaml"), "--out", cpu]) == 0
    rows = read_manifest(cpu)["runs"]
    assert len(rows) == 18 and {r["r"] for r in rows} == {2, 4}
    # grid.test_time_recur adds r_test = 1..k r to a sampled run's evaluations (the union of both)
    tt = tmp_path / "tt.yaml"
    tt.write_text(yaml.safe_dump({"extends": os.path.join(SWEEPS, "cpu_probe_random_depth.yaml"),
                                  "grid": {"test_time_recur": 1}}))
    for run in expand(load_sweep(str(tt)), str(tmp_path / "tt")):
        assert run.cfg.train.eval_recur == sorted({*range(1, run.r + 1), *law_recurrences(run.cfg.model, [1, 2, 4])})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"extends": os.path.join(SWEEPS, "demo.yaml"), "variants": {
        "x": {"recur_sampling": {"kind": "poisson_lognormal", "mean": 2, "sigma": "match_r"}}}}))
    assert main(["sweep", "plan", str(bad), "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.slow  # a sweep of subprocess trainings
def test_sampled_sweep_plan_run_collect(tmp_path, capsys):
    """Contract: plan -> run -> collect with a fixed-r run and a sampled-depth run of the same
    shape: the sampled run's table rows are one at r = round(E[r]) under its variant (named like
    the run, loss = its val_loss_by_r there) and one per evaluated r (its mean, twice it, the
    grid's r) under VARIANT_tt, named RUN@rR; the fixed-r run keeps its single row; the columns
    stay the table's (DESIGN.md's and collect's extras). test_time.csv holds each run once per
    evaluated r_test, the sampled run under its own name and variant at r = round(E[r])."""
    from test_sweep import _tiny_sweep, _write_corpus
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus)
    sweep = _tiny_sweep(r=[1, 2], budgets=[{"flops": 3e8, "sizes": [2]}])
    sweep["base"].update(
        optim={"name": "muon", "lr": 0.02, "warmup_steps": 1},
        train={"micro_batch_size": 4, "log_every": 1, "eval_tokens": 256, "progress": False},
        data={"corpus": [str(corpus)], "cache_dir": str(tmp_path / "cache"), "workers": 1})
    sweep["variants"] = {"baseline": {"r": [2]},
                         "randdepth": {"r": [2], "recur_sampling": {"kind": "poisson_lognormal", "mean": "match_r"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    out = str(tmp_path / "sweep")
    assert main(["sweep", "plan", str(tmp_path / "s.yaml"), "--out", out]) == 0
    assert main(["sweep", "run", out, "--jobs", "2"]) == 0
    assert "2 trained" in capsys.readouterr().out
    assert main(["sweep", "collect", out]) == 0
    assert "2 runs, 5 rows" in capsys.readouterr().out
    with open(os.path.join(out, "fit_table.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == ("n_once,n_rec,r,tokens,loss,run,variant,flops,seed,n_adapter,"
                        "tokens_per_param,vocab_size,skipped_steps,tokens_by_dataset")
    table = list(csv.DictReader(lines))
    s = json.load(open(os.path.join(out, "runs", "randdepth_r2_s2_c3e8", "summary.json")))
    assert s["recur_sampling"] == "poisson_lognormal" and set(s["val_loss_by_r"]) == {"1", "2", "4"}
    got = [(t["run"], t["variant"], int(t["r"]), float(t["loss"])) for t in table]
    assert got[0][:3] == ("baseline_r2_s2_c3e8", "baseline", 2)
    assert got[1:] == [("randdepth_r2_s2_c3e8", "randdepth", 2, s["val_loss_by_r"]["2"])] + [
        (f"randdepth_r2_s2_c3e8@r{r}", "randdepth_tt", r, s["val_loss_by_r"][str(r)]) for r in (1, 2, 4)]
    assert all(int(t["tokens"]) == s["tokens"] for t in table[1:])
    with open(os.path.join(out, "test_time.csv")) as f:
        curves = [(t["run"], t["variant"], int(t["r"]), int(t["r_test"]), float(t["loss"])) for t in csv.DictReader(f)]
    sampled = [c for c in curves if c[0].startswith("randdepth")]
    assert sampled == [("randdepth_r2_s2_c3e8", "randdepth", 2, r, s["val_loss_by_r"][str(r)]) for r in (1, 2, 4)]
    assert [c[0] for c in curves if c not in sampled] == ["baseline_r2_s2_c3e8"]
