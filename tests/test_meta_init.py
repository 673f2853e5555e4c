"""Meta-device initialisation (megaloop/parallel/meta_init.py): a rank that builds the model on the
meta device and materialises only its part of the layout holds exactly the single process's
initial weights.

The reference is `train.build_model` on one process (seeded, built on the CPU). Contracts:
  - under TP=2, PP=2, TP=2 x PP=2 (torch engine) and ZeRO-3 (DeepSpeed, DP=2), each rank's
    parameters equal their slice of the single process's tensors bit for bit, another stage's
    parameters are empty, and the CPU generator ends in the single process's state
    (tests/meta_init_check.py, run as the ranks; gloo);
  - on one process, a meta build parallelized for the trivial layout equals the direct build
    bit for bit, for every injection mode, and `megaloop params`' counts do not depend on it;
  - the replay is sensitive: leaving out the constructors' default draws changes the weights;
  - under precision fp8 (torchao's Float8Linear swapped in between the build and parallelize(),
    as train.py does), the same holds, on one process and on TP=2 / PP=2 ranks, and every rank
    runs the same linears in float8 as the single process (a Float8Linear, or a TP shard
    carrying its float8 config).
"""
from __future__ import annotations

import os

import pytest
import torch

from megaloop.accounting import count_params
from megaloop.config import load_config
from megaloop.parallel import meta_init
from megaloop.parallel.parallelize import parallelize
from megaloop.parallel.state import Layout, ParallelState
from megaloop.parallel.testing import spawn
from megaloop.train import build_model

CHECK = os.path.join(os.path.dirname(__file__), "meta_init_check.py")


def _cfg(injection: str = "linear"):
    return load_config(raw={"model": {"d_model": 32, "n_head": 4, "n_kv_head": 2, "vocab_size": 101, "seq_len": 16,
                                      "n_prelude": 1, "n_recur_block": 2, "n_coda": 1, "num_recur": 2,
                                      "input_injection": injection},
                            "train": {"steps": 1, "seed": 77, "device": "cpu"}})


def _meta_built(cfg):
    model = build_model(cfg, "meta")
    assert all(p.is_meta for p in model.parameters())
    pm = parallelize(model, ParallelState(Layout(1, 1, 1)), cfg, torch.device("cpu"))
    return pm.module, torch.get_rng_state()


@pytest.mark.parametrize("injection", ["linear", "additive", "hyperconnect"])
def test_meta_build_equals_the_direct_build_on_one_process(injection):
    """Every parameter and buffer of the materialised meta build is bitwise the direct build's,
    and the generator ends in the same state."""
    cfg = _cfg(injection)
    meta, rng_meta = _meta_built(cfg)
    direct = build_model(cfg)
    assert torch.equal(rng_meta, torch.get_rng_state())
    want = direct.state_dict()
    got = meta.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert torch.equal(meta.rope_cos, direct.rope_cos) and torch.equal(meta.rope_sin, direct.rope_sin)
    assert sum(p.numel() for p in meta.parameters()) == count_params(cfg.model).total


def test_meta_build_with_float8_linears_equals_the_direct_build():
    """precision fp8: the blocks' linears are Float8Linear (a torchao subclass of nn.Linear) by the
    time parallelize() materialises them; they were nn.Linear when the single process built
    them, drawing their default init. The materialised meta build is still bitwise the direct
    fp8 build, with the same linears converted, and the generator ends in the same state."""
    pytest.importorskip("torchao")
    from megaloop.fp8 import convert_for_fp8
    cfg = load_config(raw={"model": {"d_model": 128, "n_head": 2, "n_kv_head": 2, "vocab_size": 101, "seq_len": 16,
                                     "n_prelude": 1, "n_recur_block": 1, "n_coda": 1, "num_recur": 2},
                           "parallel": {"precision": "fp8"}, "train": {"steps": 1, "seed": 77, "device": "cpu"}})
    cpu = torch.device("cpu")
    meta = build_model(cfg, "meta")
    converted_meta = convert_for_fp8(meta, cfg, cpu)
    meta = parallelize(meta, ParallelState(Layout(1, 1, 1)), cfg, cpu).module
    rng_meta = torch.get_rng_state()
    direct = build_model(cfg)
    converted = convert_for_fp8(direct, cfg, cpu)
    assert len(converted) == 18 and converted_meta == converted
    assert torch.equal(rng_meta, torch.get_rng_state())
    want, got = direct.state_dict(), meta.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_replay_without_the_constructors_draws_differs(monkeypatch):
    """The check can fail: a replay that skips nn.Linear's / nn.Embedding's constructor draws
    starts init_plan on another part of the random stream, and the weights differ."""
    cfg = _cfg()
    monkeypatch.setattr(meta_init, "_draws_in_constructor", lambda m: False)
    meta, _ = _meta_built(cfg)
    direct = build_model(cfg)
    assert not torch.equal(meta.embed.weight, direct.embed.weight)


def test_init_plan_initialises_every_parameter_once():
    model = build_model(_cfg("hyperconnect"))
    names = [n for n, _ in model.init_plan()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tp,pp,zero,optim,precision", [
    (2, 2, 1, 0, "muon", "fp32"),
    (2, 1, 2, 0, "muonh", "fp32"),
    (4, 2, 2, 0, "muonh", "fp32"),
    (2, 1, 1, 3, "adamw", "fp32"),
    (2, 2, 1, 0, "muonh", "fp8"),
    (2, 1, 2, 0, "muonh", "fp8"),
], ids=["tp2", "pp2", "tp2xpp2", "zero3", "tp2_fp8", "pp2_fp8"])
def test_each_rank_holds_the_single_process_weights(nproc, tp, pp, zero, optim, precision):
    """Each rank's shards (ZeRO-3: gathered over DP) equal the single process's tensors bitwise;
    under fp8 each rank also runs exactly the single process's linears in float8."""
    if precision == "fp8":
        pytest.importorskip("torchao")
    for r in spawn(nproc, [CHECK, str(tp), str(pp), str(zero), optim, precision], timeout=300, module=None):
        assert r.returncode == 0, r.stdout[-4000:]
        assert "equal the single process's bit for bit" in r.stdout
