"""Bad parallel input fails fast and clearly on every rank.

Contract: `megaloop train` launched as N ranks with an impossible layout prints one clear error
(naming the fix) on every rank, exits with status 2, and never reaches a collective, so nothing
hangs (each case runs under a timeout). All cases are launched at once to keep the test short.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from megaloop.parallel.testing import free_port
import pytest

pytestmark = pytest.mark.slow  # multi-process (gloo process groups)

CFG = os.path.join(os.path.dirname(__file__), "..", "configs", "default.yaml")
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID")

CASES = {
    # name: (processes, launcher, overrides, expected text in every rank's error). Two ranks each:
    # process start-up dominates this test; the single-process checks live in test_parallel_units.
    "layout_not_dividing_world": (2, "torchrun", ["parallel.tp=2", "parallel.pp=2", "model.n_head=4",
                                                  "model.n_kv_head=4"], "does not divide the world size 2"),
    "heads_not_divisible_by_tp": (2, "torchrun", ["parallel.tp=2", "model.d_model=192", "model.n_head=3",
                                                  "model.n_kv_head=3"], "must divide model.n_head=3"),
    "more_stages_than_units": (2, "torchrun", ["parallel.pp=2", "model.n_prelude=0", "model.n_coda=0",
                                               "model.num_recur=1"], "more pipeline stages than the model has"),
    "slurm_without_master_addr": (2, "slurm", [], "MASTER_ADDR"),
    "muon_with_zero3": (2, "torchrun", ["optim.name=muon", "parallel.zero_stage=3"],
                        "Use parallel.zero_stage=2 (state and gradients sharded)"),
}


def _env(launcher: str, rank: int, n: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["OMP_NUM_THREADS"] = "1"
    if launcher == "torchrun":
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    elif launcher == "slurm":  # srun started the ranks directly, but the batch script set no rendezvous
        env.update(SLURM_JOB_ID="1", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(n),
                   SLURM_STEP_NUM_TASKS=str(n))
    return env


def test_bad_layouts_fail_on_every_rank_without_hanging(tmp_path):
    procs = []
    for name, (n, launcher, overrides, _) in CASES.items():
        port = free_port()
        for rank in range(n):
            cmd = [sys.executable, "-m", "megaloop.cli", "train", CFG, "--set", f"train.run_dir={tmp_path / name}",
                   "--set", "train.device=cpu"]
            for o in overrides:
                cmd += ["--set", o]
            p = subprocess.Popen(cmd, env=_env(launcher, rank, n, port), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            procs.append((name, rank, p))
    deadline = time.time() + 120
    failures = []
    for name, rank, p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for _, _, q in procs:
                q.kill()
            raise AssertionError(f"{name}: rank {rank} hung instead of failing fast")
        expect = CASES[name][3]
        if p.returncode != 2 or expect not in out or "Traceback" in out:
            failures.append(f"{name} rank {rank}: exit {p.returncode}, output:\n{out[-1500:]}")
        assert not os.path.exists(tmp_path / name / "config.yaml"), f"{name}: training started"
    assert not failures, "\n\n".join(failures)
