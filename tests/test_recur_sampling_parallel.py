"""A sampled training depth under every parallel layout equals the single process with the same draws.

`megaloop train` trains the tiny model 5 steps under each layout (tests/layouts.py); each rank
computes the step's draw from (seed, step) on its own. Under pipeline parallelism the schedule is
padded to the deepest draw and the passes beyond the step's r are skipped, so the draws below
exercise steps whose passes end on the first stage, steps that reach the last slot, detached
passes that move between stages from step to step (bptt_k), and hyperconnect lanes. Contracts, as
in test_parallel_equality.py: per-step loss equal to 1e-5 relative, final weights to 5e-5, the
same validation loss; the run's logged r are the single process's draws, which are not all equal
(a rank that drew another r would break the loss equality, or the pipeline); a pipeline run
resumes identically.
"""
from __future__ import annotations

from layouts import ADAM, check_layouts, token_data
import pytest

pytestmark = pytest.mark.slow  # multi-process (gloo process groups)

SEED = ["train.seed=5"]  # its draws on {1..4}: 3, 2, 2, 1, 3
UNIFORM = ["model.recur_sampling.kind=uniform", "model.recur_sampling.lo=1", "model.recur_sampling.hi=4", *SEED]
POISSON = ["model.recur_sampling.kind=poisson_lognormal", "model.recur_sampling.mean=1", *SEED]
# draws 1, 2, 4, 4, 2: the first step skips every pass of stage 2 (the schedule's buffers are set
# up on a step that leaves stage 2's inputs unused), later steps reach the last slot, and at r = 4
# with bptt_k = 1 stage 2 receives a state its detached pass does not differentiate
SHALLOW_FIRST = [*UNIFORM[:-1], "train.seed=4"]


def test_sampled_depth_layouts_equal_single_process(tmp_path):
    """TP=2, PP=2 (padded to 4 pass slots; also bptt_k=1 and hyperconnect, starting with a step
    that skips the second stage's passes), DP=2 on the torch engine and DP=2 under DeepSpeed
    ZeRO-1 equal the single-process run with the same draws."""
    data = token_data(str(tmp_path / "tokens"))
    cases = {
        "tp2": (["parallel.tp=2", *POISSON], POISSON),
        "pp2": (["parallel.pp=2", *UNIFORM], UNIFORM),
        "pp2_bptt": (["parallel.pp=2", *SHALLOW_FIRST, "model.bptt_k=1"], [*SHALLOW_FIRST, "model.bptt_k=1"]),
        "pp2_hyper": (["parallel.pp=2", *SHALLOW_FIRST, "model.input_injection=hyperconnect"],
                      [*SHALLOW_FIRST, "model.input_injection=hyperconnect"]),
        "dp2_torch": (UNIFORM, [*UNIFORM, "train.grad_accum=4"]),
        "dp2_zero1": (["parallel.zero_stage=1", *ADAM, *UNIFORM], [*ADAM, *UNIFORM, "train.grad_accum=4"]),
    }
    runs = check_layouts(2, str(tmp_path), cases, data, resume=("pp2",), timeout=400)
    for name, (run, ref) in runs.items():
        assert len(set(ref.num_recur)) > 1, f"{name}: the draws {ref.num_recur} do not vary; the test would prove nothing"
        assert run.num_recur == ref.num_recur, f"{name}: the run drew {run.num_recur}, the single process {ref.num_recur}"
    assert runs["pp2"][1].num_recur == [3, 2, 2, 1, 3]
    assert runs["pp2_hyper"][1].num_recur == [1, 2, 4, 4, 2]
