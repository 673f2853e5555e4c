"""Muon and MuonH with data parallelism and sharded optimiser state (megaloop/parallel/sharded_optim.py).

Contracts:
  - the owner map gives every parameter exactly one DP rank, is a pure function of the state
    sizes (so every rank computes the same map), balances them (no rank's load exceeds another's
    by more than the largest parameter's) and deals same-shaped matrices out evenly;
  - ZeRO 1 and 2 on the torch engine, for muon and muonh, run as `megaloop train` on N processes
    (tests/layouts.py), equal the single process on the same global batch (losses to 1e-5
    relative at every step, final weights to 5e-5 (5e-3 embedding and head), validation loss):
    DP=2 alone, TP=2 x DP=2 and PP=2 x DP=2 (4 processes), and AdamW on this engine (DP=2, and
    PP=2 x DP=2, which DeepSpeed cannot run);
  - the optimiser state lives on its owner only: the ranks' state bytes (summary.json's
    optim_state_bytes) add up to the single process's; the checkpoint (DCP) holds every parameter's state once, with the single process's
    entries and values, and each owner writes its own share;
  - a checkpoint saved after step 3 resumes with identical steps 4-5 (DP=2, and TP=2 x DP=2, whose
    state is TP-sharded as well). Resharding a sharded checkpoint to other layouts and to one
    process is tested in tests/test_reshard.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from layouts import ADAM, MUONH, TINY, check_layouts, token_data
from megaloop.parallel.sharded_optim import STATE_PER_ELEMENT, assign_owners

GLOBAL = ["train.grad_accum=4"]  # DP=2 x grad_accum 2 on one process


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return token_data(str(tmp_path_factory.mktemp("tokens")))


def test_owner_map_is_balanced_deterministic_and_complete():
    """On the reference iso-depth model's optimiser groups (r=4: 4 recurrent blocks, 2+2 once),
    weighted by state bytes: every parameter has one owner, the ranks' loads differ by at most
    the largest parameter's, and a group of same-shaped matrices is dealt out evenly."""
    from megaloop.config import load_config
    from megaloop.model import LoopedLM
    from megaloop.optim import param_groups

    cfg = load_config(raw={"train": {"steps": 1}, "model": {"d_model": 256, "n_head": 2, "vocab_size": 1000,
                                                            "n_prelude": 2, "n_recur_block": 4, "n_coda": 2,
                                                            "num_recur": 4}, "optim": {"name": "muonh"}})
    with torch.device("meta"):
        groups = param_groups(LoopedLM(cfg.model), cfg.optim)
    costs = [[p.numel() * STATE_PER_ELEMENT[g["kind"]] for p in g["params"]] for g in groups]
    flat = [c for cs in costs for c in cs]
    for n in (1, 2, 3, 4, 8):
        owners = assign_owners(costs, n)
        assert owners == assign_owners([list(c) for c in costs], n), "not a pure function of the costs"
        assert [len(o) for o in owners] == [len(c) for c in costs]
        mine = [r for o in owners for r in o]
        assert all(0 <= r < n for r in mine)
        load = [sum(c for c, r in zip(flat, mine) if r == k) for k in range(n)]
        assert max(load) - min(load) <= max(flat), (n, load)
        if n <= 4:  # 48 matrices and the embedding and head: every rank gets a share
            assert min(load) > 0.8 * sum(flat) / n, (n, load)
    for n in (2, 4):
        owners = assign_owners([[64 * 128] * 8], n)[0]
        assert [owners.count(r) for r in range(n)] == [8 // n] * n


def _state_bytes(run) -> list[int]:
    """Each rank's optimiser state bytes at the end of the run (summary.json, in rank order)."""
    return run.summary["optim_state_bytes"]


@pytest.mark.slow  # two gloo processes per optimiser
def test_dp2_sharded_muon_muonh_equal_single_process(tmp_path, data):
    """DP=2, 2 processes, torch engine: muon and muonh at ZeRO 1 and 2 (and AdamW at ZeRO 2 on the
    same engine) equal the single process; state only on its owner; checkpoints resume exactly."""
    root = str(tmp_path)
    single = {"z1_muon": [], "z2_muon": [], "z1_muonh": MUONH, "z2_muonh": MUONH, "z2_adamw": ADAM}
    cases = {
        "z1_muon": ["parallel.zero_stage=1"],
        "z2_muon": ["parallel.zero_stage=2"],
        "z1_muonh": ["parallel.zero_stage=1", *MUONH],
        "z2_muonh": ["parallel.zero_stage=2", *MUONH],
        "z2_adamw": ["parallel.engine=torch", "parallel.zero_stage=2", *ADAM],
    }
    runs = check_layouts(2, root, {n: (ov, [*GLOBAL, *single[n]]) for n, ov in cases.items()}, data,
                         resume=("z2_muon", "z1_muonh"), timeout=400)
    for name, (run, ref) in runs.items():
        whole, = _state_bytes(ref)
        parts = _state_bytes(run)
        assert len(parts) == 2 and sum(parts) == whole and max(parts) < 0.6 * whole, \
            f"{name}: state bytes {parts} of {whole}"
    # the checkpoint (DCP): every parameter's state once, written by its owner alone, and the
    # same entries as the single process's with the same values
    from megaloop.parallel.dcp_state import STATE_DIR, read_whole, split_optim
    run, ref = runs["z2_muonh"]
    steps = TINY["train"]["steps"]
    final, ref_final = run.checkpoint(steps), ref.checkpoint(steps)
    (st, groups), (ref_st, ref_groups) = (split_optim(read_whole(f, "optim.")) for f in (final, ref_final))
    assert groups == ref_groups and st.keys() == ref_st.keys()
    for n, entries in ref_st.items():
        assert entries.keys() == st[n].keys(), n
        for k, v in entries.items():
            w = st[n][k]
            assert torch.allclose(torch.as_tensor(w), torch.as_tensor(v), rtol=1e-4, atol=1e-6), (n, k)
    folder = os.path.join(final, STATE_DIR)
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".distcp")]
    assert len(sizes) == 2 and min(sizes) > 0.3 * sum(sizes), f"each owner writes its own share: {sizes}"


@pytest.mark.slow  # four gloo processes
def test_sharded_muon_muonh_with_tp2_and_pp2(tmp_path, data):
    """4 processes: TP=2 x DP=2 (the owning replica's TP pair gathers each sharded matrix whole)
    and PP=2 x DP=2 at r=4 (each stage partitions its own parameters; the recurrent group's tied
    copies are updated by each stage's owner), muon and muonh, ZeRO 1 and 2 (and AdamW: ZeRO under
    PP runs here too), equal the single process; TP=2 x DP=2 muonh resumes from its (TP-sharded,
    DP-partitioned) checkpoint."""
    r4 = ["model.num_recur=4"]
    cases = {
        "tp2_z1_muon": (["parallel.tp=2", "parallel.zero_stage=1"], []),
        "tp2_z2_muonh": (["parallel.tp=2", "parallel.zero_stage=2", *MUONH], MUONH),
        "pp2_z1_muonh": (["parallel.pp=2", *r4, "parallel.zero_stage=1", *MUONH], [*r4, *MUONH]),
        "pp2_z2_muon": (["parallel.pp=2", *r4, "parallel.zero_stage=2"], r4),
        "pp2_z1_adamw": (["parallel.pp=2", *r4, "parallel.zero_stage=1", *ADAM], [*r4, *ADAM]),
    }
    runs = check_layouts(4, str(tmp_path), {n: (ov, [*GLOBAL, *ref]) for n, (ov, ref) in cases.items()}, data,
                         resume=("tp2_z2_muonh",), timeout=500)
    for name, (run, ref) in runs.items():
        parts, whole = _state_bytes(run), _state_bytes(ref)[0]
        assert len(parts) == 4 and 0 < min(parts) and max(parts) < 0.6 * whole, \
            f"{name}: state bytes {parts} of {whole}"
