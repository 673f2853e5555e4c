"""Equality is the test: every parallel layout reproduces the single-process run.

A tiny looped model (d_model 32, 4 heads / 2 kv heads, vocab 101 which no TP size divides,
linear injection, prelude 1 / recur 1 / coda 1) trains 5 steps on a fixed batch. Each layout
runs as real processes on gloo (megaloop.parallel.testing), several configurations per launch so
the imports are paid once. The reference is the single-process LocalEngine on the same global
batch (DP=2 -> grad_accum doubled). Contracts:
  - losses equal to a relative 1e-5 at every step (fp32);
  - final parameters (the final checkpoint's weights, read whole) equal: per tensor ||a - b|| / ||a|| <= 5e-5
    (fp32 reduction order differs across layouts and Adam's normalisation amplifies it on
    near-zero gradient entries, so parameters cannot be bit-equal);
  - a checkpoint saved after step 3 and resumed under the same layout gives the same steps 4-5.
"""
from __future__ import annotations

import json
import os

import pytest

from megaloop.parallel.dcp_state import read_weights
from megaloop.parallel.testing import run, spawn

MUONH = ["optim.name=muonh", "optim.lr=0.014"]
LOSS_RTOL = 1e-5
PARAM_RTOL = 5e-5
_REFS: dict = {}


def _reference(root: str, overrides: list[str]) -> str:
    key = tuple(overrides)
    if key not in _REFS:
        out = os.path.join(root, f"ref{len(_REFS)}")
        run(out, overrides)
        _REFS[key] = out
    return _REFS[key]


def _launch(nproc: int, root: str, jobs: list[dict], timeout: float = 240) -> None:
    path = os.path.join(root, "jobs.json")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(jobs, f)
    res = spawn(nproc, root, [], extra=["--jobs", path], timeout=timeout)
    for r in res:
        assert r.returncode == 0, r.stdout[-6000:]


def _assert_same(ref: str, out: str, label: str) -> None:
    a = json.load(open(os.path.join(ref, "result.json")))
    b = json.load(open(os.path.join(out, "result.json")))
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"]), 1):
        assert abs(x - y) <= LOSS_RTOL * abs(x), f"{label}: step {step} loss {y} vs single-process {x}"
    assert len(a["losses"]) == len(b["losses"])
    pa = read_weights(os.path.join(ref, "final"))
    pb = read_weights(os.path.join(out, "final"))
    assert pa.keys() == pb.keys(), f"{label}: state dict keys differ: {set(pa) ^ set(pb)}"
    for k in pa:
        assert pa[k].shape == pb[k].shape, f"{label}: {k} shape {tuple(pb[k].shape)} vs {tuple(pa[k].shape)}"
        rel = float((pa[k] - pb[k]).norm() / pa[k].norm().clamp(min=1e-12))
        assert rel <= PARAM_RTOL, f"{label}: parameter {k} differs by {rel:.2e} (relative norm)"
    assert abs(a["eval_loss"] - b["eval_loss"]) <= LOSS_RTOL * abs(a["eval_loss"]), label


def _assert_resumed(out: str, resumed: str, save_at: int, label: str) -> None:
    full = json.load(open(os.path.join(out, "result.json")))["losses"][save_at:]
    again = json.load(open(os.path.join(resumed, "result.json")))["losses"]
    assert again == full, f"{label}: resumed steps {again} differ from the uninterrupted run {full}"


def _jobs(root: str, cases: dict[str, list[str]], resume: tuple = ()) -> list[dict]:
    jobs = []
    for name, ov in cases.items():
        jobs.append(dict(out=os.path.join(root, name), overrides=ov, save_at=3 if name in resume else None))
        if name in resume:
            jobs.append(dict(out=os.path.join(root, name + "_resumed"), overrides=ov, save_at=3,
                             resume=os.path.join(root, name, "ckpt_3")))
    return jobs


def test_tensor_parallel_tp2(tmp_path):
    """TP=2 (2 processes, torch engine, Muon gathered over TP): linear injection at r=2, and the
    hyperconnect lanes at r=2, equal the single-process run; so does MuonH (whole-matrix
    orthogonalisation and Frobenius norms over the TP shards); checkpoints resume identically."""
    root = str(tmp_path)
    cases = {
        "linear": ["parallel.tp=2"],
        "hyper": ["parallel.tp=2", "model.input_injection=hyperconnect"],
        "muonh": ["parallel.tp=2", *MUONH],
    }
    _launch(2, root, _jobs(root, cases, resume=("linear", "muonh")))
    _assert_same(_reference(root, []), os.path.join(root, "linear"), "tp2 linear")
    _assert_same(_reference(root, ["model.input_injection=hyperconnect"]), os.path.join(root, "hyper"), "tp2 hyper")
    _assert_same(_reference(root, MUONH), os.path.join(root, "muonh"), "tp2 muonh")
    _assert_resumed(os.path.join(root, "linear"), os.path.join(root, "linear_resumed"), 3, "tp2")
    _assert_resumed(os.path.join(root, "muonh"), os.path.join(root, "muonh_resumed"), 3, "tp2 muonh")


def test_pipeline_pp2(tmp_path):
    """PP=2 (2 processes, 1F1B over 2 micro-batches, Muon): r=4 unrolled over both stages with the
    recurrent group tied; also truncated backprop (bptt_k=2: the first stage's passes run
    detached) and hyperconnect lanes carried between stages; a checkpoint resumes identically."""
    root = str(tmp_path)
    base = ["model.num_recur=4"]
    cases = {
        "r4": ["parallel.pp=2", *base],
        "bptt": ["parallel.pp=2", *base, "model.bptt_k=2"],
        "hyper": ["parallel.pp=2", *base, "model.input_injection=hyperconnect"],
        "muonh": ["parallel.pp=2", *base, *MUONH],
    }
    _launch(2, root, _jobs(root, cases, resume=("r4",)))
    _assert_same(_reference(root, [*base, *MUONH]), os.path.join(root, "muonh"), "pp2 muonh")
    _assert_same(_reference(root, base), os.path.join(root, "r4"), "pp2 r4")
    _assert_same(_reference(root, [*base, "model.bptt_k=2"]), os.path.join(root, "bptt"), "pp2 bptt")
    _assert_same(_reference(root, [*base, "model.input_injection=hyperconnect"]), os.path.join(root, "hyper"),
                 "pp2 hyper")
    _assert_resumed(os.path.join(root, "r4"), os.path.join(root, "r4_resumed"), 3, "pp2")


def test_tp2_pp2_four_processes(tmp_path):
    """TP=2 x PP=2 on 4 processes (r=4, Muon) equals the single-process run and resumes; so does
    MuonH."""
    root = str(tmp_path)
    base = ["model.num_recur=4"]
    cases = {"tp2pp2": ["parallel.tp=2", "parallel.pp=2", *base],
             "tp2pp2_muonh": ["parallel.tp=2", "parallel.pp=2", *base, *MUONH]}
    _launch(4, root, _jobs(root, cases, resume=("tp2pp2",)), timeout=300)
    _assert_same(_reference(root, [*base, *MUONH]), os.path.join(root, "tp2pp2_muonh"), "tp2pp2 muonh")
    _assert_same(_reference(root, base), os.path.join(root, "tp2pp2"), "tp2pp2")
    _assert_resumed(os.path.join(root, "tp2pp2"), os.path.join(root, "tp2pp2_resumed"), 3, "tp2pp2")


def test_data_parallel_zero_stages(tmp_path):
    """DP=2 (2 processes): DeepSpeed ZeRO stages 1, 2, 3 with AdamW (ZeRO-3 really partitions:
    only d_model-sized tensors persist), plus ZeRO 0 with Muon on DeepSpeed and on the torch
    engine, all equal the single-process run on the same global batch; each ZeRO stage resumes
    from its own checkpoint identically."""
    root = str(tmp_path)
    adam = ["optim.name=adamw", "optim.lr=0.01"]
    cases = {f"zero{z}": [f"parallel.zero_stage={z}", *adam] for z in (1, 2, 3)}
    cases["ds_zero0_muon"] = ["parallel.engine=deepspeed", "parallel.zero_stage=0"]
    cases["torch_dp_muon"] = ["parallel.engine=torch"]
    cases["torch_dp_muonh"] = ["parallel.engine=torch", *MUONH]
    _launch(2, root, _jobs(root, cases, resume=("zero1", "zero2", "zero3")), timeout=300)
    ga = ["train.grad_accum=4"]  # the same global batch on one process
    for z in (1, 2, 3):
        _assert_same(_reference(root, [*ga, *adam]), os.path.join(root, f"zero{z}"), f"zero{z}")
        _assert_resumed(os.path.join(root, f"zero{z}"), os.path.join(root, f"zero{z}_resumed"), 3, f"zero{z}")
    _assert_same(_reference(root, ga), os.path.join(root, "ds_zero0_muon"), "deepspeed zero0 muon")
    _assert_same(_reference(root, ga), os.path.join(root, "torch_dp_muon"), "torch dp muon")
    _assert_same(_reference(root, [*ga, *MUONH]), os.path.join(root, "torch_dp_muonh"), "torch dp muonh")


@pytest.mark.parametrize("tp", [2])
def test_vocab_parallel_loss_matches_fallback(tmp_path, tp):
    """The vocab-parallel loss (kernel path) and its autograd fallback agree with each other
    and with the plain loss, including padding rows of a vocab TP does not divide."""
    root = str(tmp_path)
    res = spawn(tp, root, [], extra=["--check-ce"], timeout=120)
    for r in res:
        assert r.returncode == 0, r.stdout[-4000:]
