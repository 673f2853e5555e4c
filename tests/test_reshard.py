"""Resharding: a checkpoint (torch.distributed.checkpoint) saved under one layout resumes under another.

The tiny looped model of tests/layouts.py trains 5 steps through `megaloop train` under a source
layout, saving after step 3; a copy of that checkpoint then resumes (`megaloop train --resume`)
under a different layout for steps 4-5. Contracts:
  - the resumed steps' losses equal an uninterrupted single-process 5-step run's to a relative
    1e-5, the final parameters (read whole from the final checkpoint) to a relative norm 5e-5 per
    tensor (the equality tests' tolerances), and the final optimiser state too (Muon momentum,
    AdamW exp_avg / exp_avg_sq, group hyperparameters), with AdamW's step counter exactly equal;
  - the checkpoint holds the single-process shapes: vocab-parallel padding is never saved, and
    each rank writes its own file;
  - the data loader continues from the same global sample when the DP size changes (the
    resumed losses only match when every step sees the same samples);
  - the torch engine's sharded Muon / MuonH state (ZeRO 1 / 2: each matrix's state on its owner
    only) reshards to one process, to TP=2 and from TP=2 like any other layout's;
  - a save written in the background (train.async_save) while training goes on resumes like the
    others;
  - `megaloop checkpoint convert` reads the format before DCP checkpoints (model.pt with
    optim_full.pt or a single process's optim.pt, written here as that code wrote them), and
    refuses (one clear message) checkpoints it cannot convert.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from layouts import ADAM, LOSS_RTOL, MUONH, PARAM_RTOL, TINY, Run, resumable, token_data, train
from megaloop.parallel.dcp_state import read_weights, read_whole, split_optim

pytestmark = pytest.mark.slow  # multi-process (gloo process groups)

DP2 = ["train.grad_accum=1"]  # DP=2 x 1 micro-batch = the single process's 2 micro-batches
SAVE = ["train.save_every=3"]
FINAL = TINY["train"]["steps"]


def _tiny_cfg(overrides=()):
    from megaloop.config import _merge, config_from_dict, parse_overrides
    return config_from_dict(_merge(TINY, parse_overrides(list(overrides))))


def write_old_format(src: str, out: str, cfg, full: bool = True, local: bool = True) -> None:
    """The checkpoint folder `src` in the format before DCP checkpoints, written the way that
    code's single-process engine wrote it: model.pt (the state dict), optim.pt (torch's
    index-keyed optimiser state) and optim_full.pt (the same state keyed by parameter name),
    with trainer.pt and meta.json (config and step)."""
    from megaloop.parallel import local_engine
    from megaloop.train import build_model

    engine = local_engine(cfg, build_model(cfg), torch.device("cpu"))
    engine.load_files(src)
    os.makedirs(out)
    torch.save(engine.model.state_dict(), os.path.join(out, "model.pt"))
    if local:
        torch.save(engine.optimizer.state_dict(), os.path.join(out, "optim.pt"))
    if full:
        state = {n: dict(engine.optimizer.state[p]) for n, p in engine.model.named_parameters()
                 if engine.optimizer.state.get(p)}
        groups = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups}
        torch.save(dict(format="megaloop-optim-v1", layout=dict(engine="local", tp=1, pp=1, dp=1, zero_stage=0),
                        groups=groups, state=state), os.path.join(out, "optim_full.pt"))
    if os.path.isfile(os.path.join(src, "trainer.pt")):
        shutil.copy(os.path.join(src, "trainer.pt"), out)
    if os.path.isfile(os.path.join(src, "meta.json")):
        shutil.copy(os.path.join(src, "meta.json"), out)
    else:
        with open(os.path.join(out, "meta.json"), "w") as f:
            json.dump({"config": cfg.to_dict(), "step": 3}, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megaloop.cli import main

    root = str(tmp_path_factory.mktemp("reshard"))
    p = lambda *a: os.path.join(root, *a)  # noqa: E731
    data = token_data(p("tokens"))
    out = {}
    # single-process references (uninterrupted 5 steps, saving after step 3), then the sources
    for name, nproc, over in [("refm", 1, []), ("refa", 1, ADAM), ("refh", 1, MUONH),
                              ("tp2m", 2, ["parallel.tp=2"]), ("tp2a", 2, ["parallel.tp=2", *ADAM]),
                              ("z2a", 2, ["parallel.zero_stage=2", *DP2, *ADAM]),
                              ("z2h", 2, ["parallel.zero_stage=2", *DP2, *MUONH]),  # sharded MuonH
                              ("tp2m_async", 2, ["parallel.tp=2", "train.async_save=true"])]:
        out[name] = train(nproc, p(name), [*over, *SAVE], data)
    # the format before DCP checkpoints, converted (optim_full.pt; and optim.pt alone, with the config)
    write_old_format(out["refm"].checkpoint(3), p("old_full"), _tiny_cfg(), local=False)
    write_old_format(out["refa"].checkpoint(3), p("old_local"), _tiny_cfg(ADAM), full=False)
    assert main(["checkpoint", "convert", p("old_full"), "--out", p("conv_full")]) == 0
    assert main(["checkpoint", "convert", p("old_local"), "--out", p("conv_local")]) == 0
    # resumes under other layouts: name -> (processes, overrides, source run or converted folder)
    resumes = {
        "pp2_from_tp2": (2, ["parallel.pp=2"], "tp2m"),
        "dp2_from_tp2": (2, ["parallel.engine=torch", *DP2], "tp2m"),
        "tp2_from_single": (2, ["parallel.tp=2"], "refm"),
        "z1_from_tp2": (2, ["parallel.zero_stage=1", *DP2, *ADAM], "tp2a"),
        "z3_from_tp2": (2, ["parallel.zero_stage=3", *DP2, *ADAM], "tp2a"),
        "tp2_from_z2": (2, ["parallel.tp=2", *ADAM], "z2a"),
        "z1m_from_tp2": (2, ["parallel.zero_stage=1", *DP2], "tp2m"),
        "tp2_from_z2h": (2, ["parallel.tp=2", *MUONH], "z2h"),
        "tp2_from_old": (2, ["parallel.tp=2"], ("conv_full", "refm")),
        "z2_from_old": (2, ["parallel.zero_stage=2", *DP2, *ADAM], ("conv_local", "refa")),
        # back to one process
        "single_from_tp2": (1, [], "tp2m"),
        "single_from_z2": (1, ADAM, "z2a"),
        "single_from_z2h": (1, MUONH, "z2h"),
        "single_from_async": (1, [], "tp2m_async"),
    }
    for name, (nproc, over, src) in resumes.items():
        folder, like = (p(src[0]), out[src[1]]) if isinstance(src, tuple) else (out[src].checkpoint(3), out[src])
        again = resumable(folder, like, p(name))
        out[name] = train(nproc, again, [*over, *SAVE], data, resume=True)
    out["root"], out["data"] = root, data
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


def _assert_resumed_equal(ref: Run, out: Run, label: str) -> None:
    """Steps 4-5 of `out` (resumed after step 3) equal the uninterrupted run's; same final
    parameters and optimiser state."""
    want, got = ref.losses[3:], out.losses[3:]
    assert len(got) == len(want) == 2, f"{label}: {got}"
    for step, (x, y) in enumerate(zip(want, got), 4):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"{label}: step {step} loss {y} vs single-process {x}"
    pa, pb = (read_weights(r.checkpoint(FINAL)) for r in (ref, out))
    assert pa.keys() == pb.keys(), f"{label}: {set(pa) ^ set(pb)}"
    for k in pa:
        assert pa[k].shape == pb[k].shape and _rel(pa[k], pb[k]) <= PARAM_RTOL, f"{label}: parameter {k} differs"
    (sa, ga), (sb, gb) = (split_optim(read_whole(r.checkpoint(FINAL), "optim.")) for r in (ref, out))
    assert ga == gb, f"{label}: optimiser hyperparameters differ"
    assert sa.keys() == sb.keys(), f"{label}: {set(sa) ^ set(sb)}"
    for n, st in sa.items():
        assert st.keys() == sb[n].keys(), f"{label}: {n} state keys {sorted(sb[n])}"
        for k, v in st.items():
            w = sb[n][k]
            if k == "step":
                assert float(v) == float(w) == 5.0, f"{label}: {n} step {w} vs {v}"
            else:
                assert v.shape == w.shape, f"{label}: {n}.{k} shape {tuple(w.shape)} vs {tuple(v.shape)}"
                assert _rel(v, w) <= PARAM_RTOL, f"{label}: optimiser state {n}.{k} differs by {_rel(v, w):.2e}"


def test_tp2_checkpoint_resumes_under_pp2_dp2_and_one_process(runs):
    """TP=2 (Muon) saved after step 3 resumes under PP=2, under DP=2 at ZeRO 0 (torch engine) and
    on one process, each equal to the uninterrupted run."""
    for name in ("pp2_from_tp2", "dp2_from_tp2", "single_from_tp2"):
        _assert_resumed_equal(runs["refm"], runs[name], name)


def test_single_process_checkpoint_resumes_under_tp2(runs):
    """The reverse direction: a single-process checkpoint resumes under TP=2 (vocab padding
    re-added in memory, not on disk) equal to the single run."""
    _assert_resumed_equal(runs["refm"], runs["tp2_from_single"], "tp2_from_single")


def test_zero_stages_reshard_both_ways(runs):
    """AdamW: TP=2 -> DeepSpeed ZeRO-1 and ZeRO-3 (DP=2; partitioned state set through DeepSpeed's
    public safe_set_full_* API), and ZeRO-2 (DP=2) -> TP=2 and -> one process; AdamW's step
    counter carries over exactly."""
    for name in ("z1_from_tp2", "z3_from_tp2", "tp2_from_z2", "single_from_z2"):
        _assert_resumed_equal(runs["refa"], runs[name], name)


def test_sharded_muon_state_reshards_both_ways(runs):
    """The torch engine's sharded optimiser (state partitioned over DP by whole matrix): MuonH at
    ZeRO-2 (DP=2) -> one process and -> TP=2 (each matrix's state written by its owner alone);
    and TP=2 (Muon) -> ZeRO-1 (DP=2), each owner asking only for its entries."""
    for name in ("single_from_z2h", "tp2_from_z2h"):
        _assert_resumed_equal(runs["refh"], runs[name], name)
    _assert_resumed_equal(runs["refm"], runs["z1m_from_tp2"], "z1m_from_tp2")


def test_checkpoint_holds_single_process_shapes_one_file_per_rank(runs):
    """A TP=2 checkpoint of a vocab (101) that TP does not divide holds the embedding and head at
    101 rows, every key the single-process one, the same bytes as the single process's up to
    the layouts' float differences; each rank wrote its own file."""
    from megaloop.parallel.dcp_state import metadata

    single, tp2 = (runs[n].checkpoint(3) for n in ("refm", "tp2m"))
    ms, mt = metadata(single), metadata(tp2)
    assert ms.keys() == mt.keys()
    assert tuple(mt["model.embed.weight"].size) == tuple(mt["model.head.weight"].size) == (101, 32)
    assert all(getattr(ms[k], "size", None) == getattr(mt[k], "size", None) for k in ms)
    assert sorted(f for f in os.listdir(os.path.join(tp2, "state")) if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    a, b = read_weights(single), read_weights(tp2)
    assert all(_rel(a[k], b[k]) <= PARAM_RTOL for k in a)


def test_replicas_are_written_once_and_writes_are_spread(runs):
    """What several ranks hold is written once: the final checkpoints of DP=2 (torch engine),
    PP=2, ZeRO-1 / ZeRO-3 (DP=2) and the sharded MuonH of ZeRO-2 (DP=2, each matrix's state on its
    owner only) take exactly the bytes of the single process's, and each rank writes a share of
    them (at least a third) into its own file."""
    def sizes(name: str) -> list[int]:
        state = os.path.join(runs[name].checkpoint(FINAL), "state")
        return [os.path.getsize(os.path.join(state, f)) for f in sorted(os.listdir(state)) if f.endswith(".distcp")]

    for names, ref in ((("dp2_from_tp2", "pp2_from_tp2"), "refm"), (("z1_from_tp2", "z3_from_tp2"), "refa"),
                       (("z2h",), "refh")):
        total = sum(sizes(ref))
        for name in names:
            got = sizes(name)
            assert len(got) == 2 and sum(got) == total and min(got) >= total / 3, f"{name}: {got} vs {total}"


def test_loader_continues_from_the_same_sample_under_another_dp(runs, tmp_path):
    """End to end with the real PackedLoader: saved at TP=2 x DP=1 after 3 steps, resumed at DP=2
    (1 micro-batch per rank): steps 4-5 equal the uninterrupted single-process run (checked
    above), which holds only if the same global samples are consumed; the loader state counts all
    5 steps' samples. A resume that restarted the data instead gives different losses (the check
    is sensitive)."""
    ref, out = runs["refm"], runs["dp2_from_tp2"]
    _assert_resumed_equal(ref, out, "dp2 data")
    per_step = TINY["train"]["micro_batch_size"] * TINY["train"]["grad_accum"]
    for run in (ref, out):
        state = torch.load(os.path.join(run.checkpoint(FINAL), "trainer.pt"), weights_only=False)["loader"]
        assert state["global_samples"] == 5 * per_step
    restarted = resumable(runs["tp2m"].checkpoint(3), runs["tp2m"], str(tmp_path / "restarted"))
    trainer = os.path.join(Run(restarted).checkpoint(3), "trainer.pt")
    tr = torch.load(trainer, weights_only=False)
    tr["loader"].update(global_samples=0, counts=[0])
    torch.save(tr, trainer)
    got = train(1, restarted, SAVE, runs["data"], resume=True).losses[3:]
    assert any(abs(x - y) > 100 * LOSS_RTOL * abs(x) for x, y in zip(ref.losses[3:], got))


def test_background_save_resumes_like_a_foreground_one(runs):
    """TP=2 saving after step 3 in the background (train.async_save) while steps 4-5 run: the run
    itself is unchanged (same losses and final weights as the foreground-saving run, bit for bit),
    and its checkpoint holds the state of step 3, not of the steps taken while it was written:
    resumed on one process it equals the uninterrupted run."""
    a, b = runs["tp2m"], runs["tp2m_async"]
    assert a.losses == b.losses
    wa, wb = read_weights(a.checkpoint(FINAL)), read_weights(b.checkpoint(FINAL))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ca, cb = read_whole(a.checkpoint(3)), read_whole(b.checkpoint(3))
    assert ca.keys() == cb.keys() and all(torch.equal(v, cb[k]) if torch.is_tensor(v) else v == cb[k]
                                         for k, v in ca.items())
    _assert_resumed_equal(runs["refm"], runs["single_from_async"], "async")


def test_old_format_converts_and_resumes_under_other_layouts(runs):
    """Checkpoints of the format before DCP (model.pt with optim_full.pt; model.pt with a single
    process's optim.pt and the config in meta.json) convert losslessly (the same tensors, bit for
    bit, as the checkpoint they were made from) and resume under TP=2 and ZeRO-2 equal to the
    uninterrupted run."""
    root = runs["root"]
    for conv, src in (("conv_full", "refm"), ("conv_local", "refa")):
        a, b = read_whole(runs[src].checkpoint(3)), read_whole(os.path.join(root, conv))
        assert a.keys() == b.keys(), set(a) ^ set(b)
        for k, v in a.items():
            assert torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k], k
        assert sorted(os.listdir(os.path.join(root, conv))) == ["meta.json", "state", "trainer.pt"]
    _assert_resumed_equal(runs["refm"], runs["tp2_from_old"], "tp2 from old format")
    _assert_resumed_equal(runs["refa"], runs["z2_from_old"], "zero-2 from old format")


def test_unconvertible_and_old_checkpoints_fail_clearly(runs, capsys):
    """An old checkpoint with only per-layout optimiser shards is refused by convert; an
    unconverted old checkpoint and an already converted one are refused with the way out, one
    line, no traceback."""
    from megaloop.checkpoint import CheckpointError
    from megaloop.cli import main
    from megaloop.parallel import local_engine
    from megaloop.train import build_model

    root = runs["root"]
    old = os.path.join(root, "old_shards")
    shutil.copytree(os.path.join(root, "old_full"), old)
    os.remove(os.path.join(old, "optim_full.pt"))
    torch.save({"layout": [2, 1], "optim": {}}, os.path.join(old, "optim_tp0_pp0.pt"))
    assert main(["checkpoint", "convert", old, "--out", os.path.join(root, "nope")]) == 2
    err = capsys.readouterr().err
    assert "optim_full.pt" in err and "layout that wrote it" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(root, "nope"))
    assert main(["checkpoint", "convert", os.path.join(root, "conv_full"), "--out", os.path.join(root, "nope")]) == 2
    assert "already a DCP checkpoint" in capsys.readouterr().err
    cfg = _tiny_cfg()
    with pytest.raises(CheckpointError, match="megaloop checkpoint convert"):
        local_engine(cfg, build_model(cfg), torch.device("cpu")).load_files(os.path.join(root, "old_full"))


def test_old_format_run_directory_converts_and_resumes_bitwise(tiny_corpus, data_cache, tmp_path):
    """A run directory whose latest checkpoint is in the format before DCP checkpoints becomes,
    through `megaloop checkpoint convert RUN --out NEW`, a run directory that `megaloop train
    NEW/config.yaml --resume` continues: on one process, bit for bit as the uninterrupted run
    (losses and final weights). The source is left as it was."""
    import subprocess
    import sys

    import yaml

    from conftest import tiny_raw
    from megaloop import checkpoint as ckpt
    from megaloop.cli import main
    from megaloop.config import load_config
    from megaloop.train import train
    from test_train import losses

    full = str(tmp_path / "full")
    train(load_config(raw=tiny_raw(tiny_corpus, data_cache, full, steps=6, save_every=3)), log=lambda *a: None)
    part = str(tmp_path / "part")
    cfg_path = tmp_path / "part.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw(tiny_corpus, data_cache, part, steps=6, save_every=3)))
    proc = subprocess.run([sys.executable, "-m", "megaloop.cli", "train", str(cfg_path)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, MEGALOOP_FAULT="step:4"))
    assert proc.returncode == -9, proc.stderr[-2000:]
    latest = ckpt.latest_path(part)
    write_old_format(latest, latest + ".old", load_config(str(cfg_path)))
    shutil.rmtree(latest)
    os.replace(latest + ".old", latest)
    before = sorted(os.listdir(latest))
    assert before == ["meta.json", "model.pt", "optim.pt", "optim_full.pt", "trainer.pt"]
    new = str(tmp_path / "new")
    assert main(["checkpoint", "convert", part, "--out", new]) == 0
    assert sorted(os.listdir(latest)) == before
    cfg = load_config(os.path.join(new, "config.yaml"))
    assert cfg.train.run_dir == new
    train(cfg, resume=True, log=lambda *a: None)
    assert losses(new) == losses(full)
    a, b = (read_weights(ckpt.latest_path(d)) for d in (full, new))
    assert all(torch.equal(a[k], b[k]) for k in a)
