"""Equality is the test: every parallel layout reproduces the single-process run of `megaloop train`.

Each layout runs `megaloop train` itself on N processes (gloo), 5 steps of a tiny looped model
(d_model 32, 4 heads / 2 kv heads, vocab 101 which no TP size divides) over a tiny tokenized
corpus on disk (tests/layouts.py). The reference is `megaloop train` on one process with the same
global batch (DP=2 -> grad_accum doubled). Contracts:
  - losses equal to a relative 1e-5 at every step (fp32), and so is the final validation loss;
  - the final weights (the latest checkpoint, loaded as `megaloop eval` loads it) equal to a
    relative norm of 5e-5 per tensor, 5e-3 for the embedding and head (reduction order differs
    across layouts, so not bitwise; tests/layouts.py says why the vocabulary rows differ more);
  - a run resumed with `--resume` from the checkpoint saved after step 3, under the same
    layout, gives the same steps 4-5 bit for bit.
"""
from __future__ import annotations

import os

import pytest

from layouts import ADAM, MUONH, check_layouts, token_data
from megaloop.parallel.testing import spawn

pytestmark = pytest.mark.slow  # multi-process (gloo process groups)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return token_data(str(tmp_path_factory.mktemp("tokens")))


def test_tensor_parallel_tp2(tmp_path, data):
    """TP=2 (2 processes, Muon gathered over TP): linear injection at r=2, and the hyperconnect
    lanes at r=2, equal the single-process run; so does MuonH (whole-matrix orthogonalisation and
    Frobenius norms over the TP shards); checkpoints resume identically."""
    hyper = ["model.input_injection=hyperconnect"]
    cases = {
        "linear": (["parallel.tp=2"], []),
        "hyper": (["parallel.tp=2", *hyper], hyper),
        "muonh": (["parallel.tp=2", *MUONH], MUONH),
    }
    check_layouts(2, str(tmp_path), cases, data, resume=("linear", "muonh"))


def test_pipeline_pp2(tmp_path, data):
    """PP=2 (2 processes, 1F1B over 2 micro-batches, Muon): r=4 unrolled over both stages with the
    recurrent group tied; also truncated backprop (bptt_k=2: the first stage's passes run
    detached), hyperconnect lanes carried between stages, and MuonH; a checkpoint resumes
    identically."""
    base = ["model.num_recur=4"]
    variants = {"r4": [], "bptt": ["model.bptt_k=2"], "hyper": ["model.input_injection=hyperconnect"],
                "muonh": MUONH}
    cases = {name: (["parallel.pp=2", *base, *v], [*base, *v]) for name, v in variants.items()}
    check_layouts(2, str(tmp_path), cases, data, resume=("r4",))


def test_tp2_pp2_four_processes(tmp_path, data):
    """TP=2 x PP=2 on 4 processes (r=4, Muon) equals the single-process run and resumes; so does
    MuonH."""
    base = ["model.num_recur=4"]
    cases = {"tp2pp2": (["parallel.tp=2", "parallel.pp=2", *base], base),
             "tp2pp2_muonh": (["parallel.tp=2", "parallel.pp=2", *base, *MUONH], [*base, *MUONH])}
    check_layouts(4, str(tmp_path), cases, data, resume=("tp2pp2",), timeout=400)


def test_data_parallel_zero_stages(tmp_path, data):
    """DP=2 (2 processes): DeepSpeed ZeRO stages 1, 2, 3 with AdamW (ZeRO-3 really partitions:
    only d_model-sized tensors persist), and ZeRO 0 (the torch engine) with Muon and MuonH, all
    equal the single-process run on the same global batch; each ZeRO stage resumes from its own
    checkpoint identically."""
    ga = ["train.grad_accum=4"]  # the same global batch on one process
    cases = {f"zero{z}": ([f"parallel.zero_stage={z}", *ADAM], [*ga, *ADAM]) for z in (1, 2, 3)}
    cases["dp_muon"] = ([], ga)
    cases["dp_muonh"] = (MUONH, [*ga, *MUONH])
    check_layouts(2, str(tmp_path), cases, data, resume=("zero1", "zero2", "zero3"))


def test_vocab_parallel_loss_matches_the_plain_loss(tmp_path):
    """The vocab-parallel loss (the fused kernel over a TP group) agrees with the plain loss, its
    gradients with the plain gradients, including padding rows of a vocab TP does not divide."""
    script = os.path.join(os.path.dirname(__file__), "vocab_parallel_ce_check.py")
    for r in spawn(2, [script], timeout=120, module=None):
        assert r.returncode == 0, r.stdout[-4000:]
