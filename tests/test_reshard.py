"""Resharding: a checkpoint saved under one parallel layout resumes under another.

The tiny looped model of tests/test_parallel_equality.py trains 3 steps under a source layout
and saves; the checkpoint then resumes under a different layout for steps 4-5. Contracts:
  - the resumed steps' losses equal an uninterrupted single-process 5-step run's to a relative
    1e-5, the final consolidated parameters to a relative norm 5e-5 per tensor (the equality
    tests' tolerances), and the final optimiser state (optim_full.pt: Muon momentum, AdamW
    exp_avg / exp_avg_sq) too, with AdamW's step counter exactly equal;
  - the data loader continues from the same global sample when the DP size changes (the
    resumed losses only match when every step sees the same samples);
  - `megaloop checkpoint convert` writes a layout-independent folder any layout resumes from,
    and refuses (one clear message) checkpoints it cannot convert.
All multi-process runs share one launch of 2 processes (gloo); sources first, then resumes.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from megaloop.parallel.testing import TINY, run, spawn

LOSS_RTOL = 1e-5
PARAM_RTOL = 5e-5
ADAM = ["optim.name=adamw", "optim.lr=0.01"]
DP2 = ["train.grad_accum=1"]  # DP=2 x 1 micro-batch = the single process's 2 micro-batches


def _token_data(prefix: str) -> None:
    from megaloop.data.indexed import IndexedDatasetWriter
    rng = np.random.default_rng(5)
    with IndexedDatasetWriter(prefix, TINY["model"]["vocab_size"], 0) as w:
        for _ in range(40):
            w.add_document(rng.integers(1, TINY["model"]["vocab_size"], size=int(rng.integers(20, 80))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    data = p("tokens")
    _token_data(data)
    # single-process references (uninterrupted 5 steps; refm also saves after step 3)
    run(p("refm"), [], save_at=3)
    run(p("refa"), ADAM)
    run(p("refd"), [], data=data)
    ck = lambda name: p(name, "ckpt_3")  # noqa: E731
    jobs = [  # sources (save after step 3), then resumes under other layouts
        dict(out=p("tp2m"), overrides=["parallel.tp=2"], save_at=3),
        dict(out=p("tp2a"), overrides=["parallel.tp=2", *ADAM], save_at=3),
        dict(out=p("tp2d"), overrides=["parallel.tp=2"], save_at=3, data=data),
        dict(out=p("z2a"), overrides=["parallel.zero_stage=2", *DP2, *ADAM], save_at=3),
        dict(out=p("pp2_from_tp2"), overrides=["parallel.pp=2"], save_at=3, resume=ck("tp2m")),
        dict(out=p("dp2_from_tp2"), overrides=["parallel.engine=torch", *DP2], save_at=3, resume=ck("tp2m")),
        dict(out=p("ds0_from_tp2"), overrides=["parallel.engine=deepspeed", "parallel.zero_stage=0", *DP2],
             save_at=3, resume=ck("tp2m")),
        dict(out=p("tp2_from_single"), overrides=["parallel.tp=2"], save_at=3, resume=ck("refm")),
        dict(out=p("dp2d_from_tp2d"), overrides=["parallel.engine=torch", *DP2], save_at=3, resume=ck("tp2d"),
             data=data),
        dict(out=p("z1_from_tp2"), overrides=["parallel.zero_stage=1", *DP2, *ADAM], save_at=3, resume=ck("tp2a")),
        dict(out=p("z3_from_tp2"), overrides=["parallel.zero_stage=3", *DP2, *ADAM], save_at=3, resume=ck("tp2a")),
        dict(out=p("tp2_from_z2"), overrides=["parallel.tp=2", *ADAM], save_at=3, resume=ck("z2a")),
    ]
    with open(p("jobs.json"), "w") as f:
        json.dump(jobs, f)
    for r in spawn(2, p("launch"), [], extra=["--jobs", p("jobs.json")], timeout=400):
        assert r.returncode == 0, r.stdout[-6000:]
    # back to one process: from TP=2 through `megaloop checkpoint convert`, and from ZeRO-2
    from megaloop.cli import main
    assert main(["checkpoint", "convert", ck("tp2m"), "--out", p("converted")]) == 0
    run(p("single_from_tp2"), [], save_at=3, resume=p("converted"))
    run(p("single_from_z2"), ADAM, save_at=3, resume=ck("z2a"))
    return root


def _result(path: str) -> dict:
    with open(os.path.join(path, "result.json")) as f:
        return json.load(f)


def _assert_resumed_equal(ref: str, out: str, label: str) -> None:
    """Steps 4-5 of `out` (resumed after step 3) equal the uninterrupted run's; same final
    parameters and optimiser state."""
    want, got = _result(ref)["losses"][3:], _result(out)["losses"]
    assert len(got) == len(want) == 2, f"{label}: {got}"
    for step, (x, y) in enumerate(zip(want, got), 4):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"{label}: step {step} loss {y} vs single-process {x}"
    pa, pb = (torch.load(os.path.join(d, "final", "model.pt")) for d in (ref, out))
    assert pa.keys() == pb.keys(), f"{label}: {set(pa) ^ set(pb)}"
    for k in pa:
        rel = float((pa[k] - pb[k]).norm() / pa[k].norm().clamp(min=1e-12))
        assert rel <= PARAM_RTOL, f"{label}: parameter {k} differs by {rel:.2e}"
    oa, ob = (torch.load(os.path.join(d, "final", "optim_full.pt"), weights_only=False) for d in (ref, out))
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
    """TP=2 (Muon) saved after step 3 resumes under PP=2, under DP=2 at ZeRO 0 (torch engine and
    DeepSpeed) and on one process (via `checkpoint convert`), each equal to the uninterrupted run."""
    ref = os.path.join(runs, "refm")
    for name in ("pp2_from_tp2", "dp2_from_tp2", "ds0_from_tp2", "single_from_tp2"):
        _assert_resumed_equal(ref, os.path.join(runs, name), name)


def test_single_process_checkpoint_resumes_under_tp2(runs):
    """The reverse direction: a single-process checkpoint (optim.pt + optim_full.pt) resumes under
    TP=2 (vocab padding re-added to the sharded embedding/head state) equal to the single run."""
    _assert_resumed_equal(os.path.join(runs, "refm"), os.path.join(runs, "tp2_from_single"), "tp2_from_single")


def test_zero_stages_reshard_both_ways(runs):
    """AdamW: TP=2 -> DeepSpeed ZeRO-1 and ZeRO-3 (DP=2; partitioned flat state set through
    DeepSpeed's safe_set_full_* API), and ZeRO-2 (DP=2) -> TP=2 and -> one process; AdamW's
    step counter carries over exactly."""
    ref = os.path.join(runs, "refa")
    for name in ("z1_from_tp2", "z3_from_tp2", "tp2_from_z2", "single_from_z2"):
        _assert_resumed_equal(ref, os.path.join(runs, name), name)


def test_loader_continues_from_the_same_sample_under_another_dp(runs):
    """End to end with the real PackedLoader: saved at TP=2 x DP=1 after 3 steps, resumed at DP=2
    (1 micro-batch per rank): steps 4-5 equal the uninterrupted single-process run, which holds only
    if the same global samples are consumed; the loader state counts all 5 steps' samples. A
    resume that restarted the data instead gives different losses (the check is sensitive)."""
    ref, out = os.path.join(runs, "refd"), os.path.join(runs, "dp2d_from_tp2d")
    _assert_resumed_equal(ref, out, "dp2 data")
    per_step = TINY["train"]["micro_batch_size"] * TINY["train"]["grad_accum"]
    for d in (ref, out):
        state = torch.load(os.path.join(d, "final", "trainer.pt"), weights_only=False)["loader"]
        assert state["global_samples"] == 5 * per_step
    restarted = os.path.join(runs, "restarted_ckpt")
    shutil.copytree(os.path.join(runs, "tp2d", "ckpt_3"), restarted)
    tr = torch.load(os.path.join(restarted, "trainer.pt"), weights_only=False)
    tr["loader"].update(global_samples=0, counts=[0])
    torch.save(tr, os.path.join(restarted, "trainer.pt"))
    run(os.path.join(runs, "restarted"), [], save_at=3, resume=restarted, data=os.path.join(runs, "tokens"))
    want, got = _result(ref)["losses"][3:], _result(os.path.join(runs, "restarted"))["losses"]
    assert any(abs(x - y) > 100 * LOSS_RTOL * abs(x) for x, y in zip(want, got))


def test_optim_full_matches_native_single_process_state(runs):
    """optim_full.pt of a single-process checkpoint is its optim.pt keyed by parameter name
    (bitwise), convert rebuilds it from optim.pt alone (with the config in meta.json), and a
    single process resumes from optim_full.pt alone with the identical optimiser state."""
    from megaloop.config import _merge, config_from_dict
    from megaloop.parallel import local_engine
    from megaloop.reshard import full_from_local
    from megaloop.train import build_model

    src = os.path.join(runs, "refm", "ckpt_3")
    native = torch.load(os.path.join(src, "optim.pt"), weights_only=False)
    full = torch.load(os.path.join(src, "optim_full.pt"), weights_only=False)
    cfg = config_from_dict(_merge(TINY, {}))
    rebuilt = full_from_local(native, cfg)
    assert rebuilt["groups"] == full["groups"] and rebuilt["state"].keys() == full["state"].keys()
    for n, st in full["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(rebuilt["state"][n][k])) for k, v in st.items())
    # convert from optim.pt only (an older single-process checkpoint)
    old = os.path.join(runs, "old_local")
    shutil.copytree(src, old)
    os.remove(os.path.join(old, "optim_full.pt"))
    with open(os.path.join(old, "meta.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "step": 3}, f)
    from megaloop.cli import main
    assert main(["checkpoint", "convert", old, "--out", os.path.join(runs, "old_converted")]) == 0
    assert sorted(os.listdir(os.path.join(runs, "old_converted"))) == ["meta.json", "model.pt", "optim_full.pt"]
    # load from optim_full.pt alone
    only_full = os.path.join(runs, "only_full")
    shutil.copytree(os.path.join(runs, "old_converted"), only_full)
    a = local_engine(cfg, build_model(cfg), torch.device("cpu"))
    a.load_files(src)
    b = local_engine(cfg, build_model(cfg), torch.device("cpu"))
    b.load_files(only_full)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for k in sa["state"][i])


def test_unconvertible_checkpoints_fail_clearly(runs, capsys):
    """A checkpoint with only per-layout optimiser shards (written before resharding support) is
    refused by convert and by another layout's resume, with a message naming the way out."""
    from megaloop.checkpoint import CheckpointError
    from megaloop.cli import main
    from megaloop.config import _merge, config_from_dict
    from megaloop.parallel import local_engine
    from megaloop.train import build_model

    old = os.path.join(runs, "old_tp2")
    shutil.copytree(os.path.join(runs, "tp2m", "ckpt_3"), old)
    os.remove(os.path.join(old, "optim_full.pt"))
    assert main(["checkpoint", "convert", old, "--out", os.path.join(runs, "nope")]) == 2
    err = capsys.readouterr().err
    assert "optim_full.pt" in err and "layout that wrote it" in err and "Traceback" not in err
    cfg = config_from_dict(_merge(TINY, {}))
    with pytest.raises(CheckpointError, match="neither optim.pt nor optim_full.pt"):
        local_engine(cfg, build_model(cfg), torch.device("cpu")).load_files(old)
