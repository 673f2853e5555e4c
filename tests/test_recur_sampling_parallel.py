"""A sampled training depth under every parallel layout equals the single process with the same draws.

The equality harness (megaloop.parallel.testing) trains the tiny model 5 steps; each rank computes
the step's draw from (seed, step) on its own. Under pipeline parallelism the schedule is padded to
the deepest draw and the passes beyond the step's r are skipped, so the draws below exercise
steps whose passes end on the first stage, steps that reach the last slot, detached passes that
move between stages from step to step (bptt_k), and hyperconnect lanes. One launch of 2 processes
runs every layout (imports paid once). Contracts, as in test_parallel_equality.py: per-step loss
equal to 1e-5 relative, final parameters to 5e-5, the same eval loss; every rank drew the same r,
which are the single process's draws and not all equal; a pipeline checkpoint resumes identically.
"""
from __future__ import annotations

import json
import os

from megaloop.parallel.testing import run
from test_parallel_equality import _assert_resumed, _assert_same, _jobs, _launch

SEED = ["train.seed=5"]  # its draws on {1..4}: 3, 2, 2, 1, 3
UNIFORM = ["model.recur_sampling.kind=uniform", "model.recur_sampling.lo=1", "model.recur_sampling.hi=4", *SEED]
POISSON = ["model.recur_sampling.kind=poisson_lognormal", "model.recur_sampling.mean=1", *SEED]
# draws 1, 2, 4, 4, 2: the first step skips every pass of stage 2 (the schedule's buffers are set
# up on a step that leaves stage 2's inputs unused), later steps reach the last slot, and at r = 4
# with bptt_k = 1 stage 2 receives a state its detached pass does not differentiate
SHALLOW_FIRST = [*UNIFORM[:-1], "train.seed=4"]
ADAM = ["optim.name=adamw", "optim.lr=0.01"]


def test_sampled_depth_layouts_equal_single_process(tmp_path):
    """TP=2, PP=2 (padded to 4 pass slots; also bptt_k=1 and hyperconnect, starting with a step
    that skips the second stage's passes), DP=2 on the torch engine and DP=2 under DeepSpeed
    ZeRO-1 equal the single-process run with the same draws."""
    root = str(tmp_path)
    cases = {
        "tp2": (["parallel.tp=2", *POISSON], POISSON),
        "pp2": (["parallel.pp=2", *UNIFORM], UNIFORM),
        "pp2_bptt": (["parallel.pp=2", *SHALLOW_FIRST, "model.bptt_k=1"], [*SHALLOW_FIRST, "model.bptt_k=1"]),
        "pp2_hyper": (["parallel.pp=2", *SHALLOW_FIRST, "model.input_injection=hyperconnect"],
                      [*SHALLOW_FIRST, "model.input_injection=hyperconnect"]),
        "dp2_torch": (["parallel.engine=torch", *UNIFORM], [*UNIFORM, "train.grad_accum=4"]),
        "dp2_zero1": (["parallel.zero_stage=1", *ADAM, *UNIFORM], [*ADAM, *UNIFORM, "train.grad_accum=4"]),
    }
    _launch(2, root, _jobs(root, {k: v[0] for k, v in cases.items()}, resume=("pp2",)), timeout=400)
    for name, (_, single) in cases.items():
        ref = os.path.join(root, "ref_" + name)
        run(ref, single)
        out = os.path.join(root, name)
        _assert_same(ref, out, name)
        draws = json.load(open(os.path.join(ref, "result.json")))["num_recur"]
        assert len(set(draws)) > 1, f"{name}: the draws {draws} do not vary; the test would prove nothing"
        for rank in (0, 1):
            got = json.load(open(os.path.join(out, f"rank{rank}.json")))["num_recur"]
            assert got == draws, f"{name}: rank {rank} drew {got}, the single process {draws}"
    assert json.load(open(os.path.join(root, "ref_pp2", "result.json")))["num_recur"] == [3, 2, 2, 1, 3]
    assert json.load(open(os.path.join(root, "ref_pp2_hyper", "result.json")))["num_recur"] == [1, 2, 4, 4, 2]
    _assert_resumed(os.path.join(root, "pp2"), os.path.join(root, "pp2_resumed"), 3, "pp2")
