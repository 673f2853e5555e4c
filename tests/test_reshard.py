"""Resharding: a checkpoint saved under one parallel layout resumes under another.

The tiny looped model of tests/layouts.py trains 5 steps through `megaloop train` under a source
layout, saving after step 3; a copy of that checkpoint then resumes (`megaloop train --resume`)
under a different layout for steps 4-5. Contracts:
  - the resumed steps' losses equal an uninterrupted single-process 5-step run's to a relative
    1e-5, the final weights to a relative norm 5e-5 per tensor (the equality tests' tolerances),
    and the final optimiser state (optim_full.pt: Muon momentum, AdamW exp_avg / exp_avg_sq) too,
    with AdamW's step counter exactly equal;
  - the data loader continues from the same global sample when the DP size changes (the
    resumed losses only match when every step sees the same samples);
  - `megaloop checkpoint convert` writes a layout-independent folder any layout resumes from,
    and refuses (one clear message) checkpoints it cannot convert.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from layouts import ADAM, LOSS_RTOL, PARAM_RTOL, TINY, Run, resumable, token_data, train

DP2 = ["train.grad_accum=1"]  # DP=2 x 1 micro-batch = the single process's 2 micro-batches
SAVE = ["train.save_every=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    data = token_data(p("tokens"))
    out = {}
    # single-process references (uninterrupted 5 steps, saving after step 3), then the sources
    for name, nproc, over in [("refm", 1, []), ("refa", 1, ADAM), ("tp2m", 2, ["parallel.tp=2"]),
                              ("tp2a", 2, ["parallel.tp=2", *ADAM]),
                              ("z2a", 2, ["parallel.zero_stage=2", *DP2, *ADAM])]:
        out[name] = train(nproc, p(name), [*over, *SAVE], data)
    # resumes under other layouts: name -> (processes, overrides, source run)
    resumes = {
        "pp2_from_tp2": (2, ["parallel.pp=2"], "tp2m"),
        "dp2_from_tp2": (2, DP2, "tp2m"),
        "tp2_from_single": (2, ["parallel.tp=2"], "refm"),
        "z1_from_tp2": (2, ["parallel.zero_stage=1", *DP2, *ADAM], "tp2a"),
        "z3_from_tp2": (2, ["parallel.zero_stage=3", *DP2, *ADAM], "tp2a"),
        "tp2_from_z2": (2, ["parallel.tp=2", *ADAM], "z2a"),
        "single_from_z2": (1, ADAM, "z2a"),
    }
    for name, (nproc, over, src) in resumes.items():
        again = resumable(out[src].checkpoint(3), out[src], p(name))
        out[name] = train(nproc, again, [*over, *SAVE], data, resume=True)
    # back to one process from TP=2 through `megaloop checkpoint convert`
    from megaloop.cli import main
    assert main(["checkpoint", "convert", out["tp2m"].checkpoint(3), "--out", p("converted")]) == 0
    out["single_from_tp2"] = train(1, resumable(p("converted"), out["tp2m"], p("single_from_tp2")), SAVE, data,
                                   resume=True)
    out["data"] = data
    return out


def _optim_full(run: Run) -> dict:
    return torch.load(os.path.join(run.checkpoint(5), "optim_full.pt"), weights_only=False)


def _assert_resumed_equal(ref: Run, out: Run, label: str) -> None:
    """Steps 4-5 of `out` (resumed after step 3) equal the uninterrupted run's; same final
    parameters and optimiser state."""
    want, got = ref.losses[3:], out.losses[3:]
    assert len(got) == len(want) == 2, f"{label}: {got}"
    for step, (x, y) in enumerate(zip(want, got), 4):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"{label}: step {step} loss {y} vs single-process {x}"
    pa, pb = ref.weights(), out.weights()
    assert pa.keys() == pb.keys(), f"{label}: {set(pa) ^ set(pb)}"
    for k in pa:
        rel = float((pa[k] - pb[k]).norm() / pa[k].norm().clamp(min=1e-12))
        assert rel <= PARAM_RTOL, f"{label}: parameter {k} differs by {rel:.2e}"
    oa, ob = _optim_full(ref), _optim_full(out)
    assert oa["groups"] == ob["groups"], f"{label}: optimiser hyperparameters differ"
    assert oa["state"].keys() == ob["state"].keys(), f"{label}: {set(oa['state']) ^ set(ob['state'])}"
    for n, st in oa["state"].items():
        assert st.keys() == ob["state"][n].keys(), f"{label}: {n} state keys {sorted(ob['state'][n])}"
        for k, v in st.items():
            w = ob["state"][n][k]
            if k == "step":
                assert float(v) == float(w) == 5.0, f"{label}: {n} step {w} vs {v}"
            else:
                assert v.shape == w.shape, f"{label}: {n}.{k} shape {tuple(w.shape)} vs {tuple(v.shape)}"
                rel = float((v - w).norm() / v.norm().clamp(min=1e-12))
                assert rel <= PARAM_RTOL, f"{label}: optimiser state {n}.{k} differs by {rel:.2e}"


def test_tp2_checkpoint_resumes_under_pp2_dp2_and_one_process(runs):
    """TP=2 (Muon) saved after step 3 resumes under PP=2, under DP=2 (ZeRO 0) and on one process
    (via `checkpoint convert`), each equal to the uninterrupted single-process run."""
    for name in ("pp2_from_tp2", "dp2_from_tp2", "single_from_tp2"):
        _assert_resumed_equal(runs["refm"], runs[name], name)


def test_single_process_checkpoint_resumes_under_tp2(runs):
    """The reverse direction: a single-process checkpoint (optim.pt + optim_full.pt) resumes under
    TP=2 (vocab padding re-added to the sharded embedding/head state) equal to the single run."""
    _assert_resumed_equal(runs["refm"], runs["tp2_from_single"], "tp2_from_single")


def test_zero_stages_reshard_both_ways(runs):
    """AdamW: TP=2 -> DeepSpeed ZeRO-1 and ZeRO-3 (DP=2; partitioned flat state set through
    DeepSpeed's safe_set_full_* API), and ZeRO-2 (DP=2) -> TP=2 and -> one process; AdamW's
    step counter carries over exactly."""
    for name in ("z1_from_tp2", "z3_from_tp2", "tp2_from_z2", "single_from_z2"):
        _assert_resumed_equal(runs["refa"], runs[name], name)


def test_loader_continues_from_the_same_sample_under_another_dp(runs, tmp_path):
    """Saved at TP=2 x DP=1 after 3 steps, resumed at DP=2 (1 micro-batch per rank): steps 4-5
    equal the uninterrupted single-process run (checked above), which holds only if the same
    global samples are consumed; the loader state counts all 5 steps' samples. A resume that
    restarted the data instead gives different losses (the check is sensitive)."""
    ref, out = runs["refm"], runs["dp2_from_tp2"]
    per_step = TINY["train"]["micro_batch_size"] * TINY["train"]["grad_accum"]
    for run in (ref, out):
        state = torch.load(os.path.join(run.checkpoint(5), "trainer.pt"), weights_only=False)["loader"]
        assert state["global_samples"] == 5 * per_step
    restarted = resumable(runs["tp2m"].checkpoint(3), runs["tp2m"], str(tmp_path / "restarted"))
    trainer = os.path.join(Run(restarted).checkpoint(3), "trainer.pt")
    tr = torch.load(trainer, weights_only=False)
    tr["loader"].update(global_samples=0, counts=[0])
    torch.save(tr, trainer)
    got = train(1, restarted, SAVE, runs["data"], resume=True).losses[3:]
    assert any(abs(x - y) > 100 * LOSS_RTOL * abs(x) for x, y in zip(ref.losses[3:], got))


def test_optim_full_matches_native_single_process_state(runs, tmp_path):
    """optim_full.pt of a single-process checkpoint is its optim.pt keyed by parameter name
    (bitwise), convert rebuilds it from optim.pt alone (with the config in meta.json), and a
    single process resumes from optim_full.pt alone with the identical optimiser state."""
    from megaloop.config import _merge, config_from_dict
    from megaloop.parallel import local_engine
    from megaloop.reshard import full_from_local
    from megaloop.train import build_model

    src = runs["refm"].checkpoint(3)
    native = torch.load(os.path.join(src, "optim.pt"), weights_only=False)
    full = torch.load(os.path.join(src, "optim_full.pt"), weights_only=False)
    cfg = config_from_dict(_merge(TINY, {}))
    rebuilt = full_from_local(native, cfg)
    assert rebuilt["groups"] == full["groups"] and rebuilt["state"].keys() == full["state"].keys()
    for n, st in full["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(rebuilt["state"][n][k])) for k, v in st.items())
    # convert from optim.pt only (an older single-process checkpoint)
    old = str(tmp_path / "old_local")
    shutil.copytree(src, old)
    os.remove(os.path.join(old, "optim_full.pt"))
    with open(os.path.join(old, "meta.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "step": 3}, f)
    from megaloop.cli import main
    converted = str(tmp_path / "old_converted")
    assert main(["checkpoint", "convert", old, "--out", converted]) == 0
    assert sorted(os.listdir(converted)) == ["meta.json", "model.pt", "optim_full.pt", "trainer.pt"]
    # load from optim_full.pt alone
    only_full = str(tmp_path / "only_full")
    shutil.copytree(converted, only_full)
    a = local_engine(cfg, build_model(cfg), torch.device("cpu"))
    a.load_files(src)
    b = local_engine(cfg, build_model(cfg), torch.device("cpu"))
    b.load_files(only_full)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for k in sa["state"][i])


def test_unconvertible_checkpoints_fail_clearly(runs, capsys, tmp_path):
    """A checkpoint with only per-layout optimiser shards (written before resharding support) is
    refused by convert and by another layout's resume, with a message naming the way out."""
    from megaloop.checkpoint import CheckpointError
    from megaloop.cli import main
    from megaloop.config import _merge, config_from_dict
    from megaloop.parallel import local_engine
    from megaloop.train import build_model

    old = str(tmp_path / "old_tp2")
    shutil.copytree(runs["tp2m"].checkpoint(3), old)
    os.remove(os.path.join(old, "optim_full.pt"))
    assert main(["checkpoint", "convert", old, "--out", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "optim_full.pt" in err and "layout that wrote it" in err and "Traceback" not in err
    cfg = config_from_dict(_merge(TINY, {}))
    with pytest.raises(CheckpointError, match="neither optim.pt nor optim_full.pt"):
        local_engine(cfg, build_model(cfg), torch.device("cpu")).load_files(old)
