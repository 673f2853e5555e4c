"""The launch scripts: each parses (`bash -n`), and in --dry-run prints the exact command it would
run, which these tests check token by token (SLURM runs use a fake allocation and a stub scontrol)."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPTS = ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/slurm/single_node.sbatch",
           "launch/slurm/multi_node.sbatch"]
CLEAN = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE",
         "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "NPROC", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in CLEAN}
    e.update(env or {})
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], env=e, capture_output=True, text=True,
                          timeout=30)


def _cmd(out: str) -> list[str]:
    return shlex.split(out.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, script)]).returncode == 0


def test_torchrun_single_node():
    r = _run("launch/torchrun.sh", "--dry-run", "--nproc", "4", "configs/default.yaml", "--set", "parallel.tp=2")
    assert r.returncode == 0, r.stderr
    assert _cmd(r.stdout) == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "4", "-m",
                              "megaloop.cli", "train", "configs/default.yaml", "--set", "parallel.tp=2"]
    assert _run("launch/torchrun.sh", "--dry-run").returncode == 2  # no config: usage, non-zero


def test_deepspeed_hostfile(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    r = _run("launch/deepspeed.sh", "--dry-run", "--hostfile", str(hf), "configs/default.yaml",
             "--set", "parallel.zero_stage=2", "--set", "optim.name=adamw")
    assert r.returncode == 0, r.stderr
    assert _cmd(r.stdout) == ["deepspeed", "--hostfile", str(hf), "--master_addr", "node-a", "--master_port", "29500",
                              "--module", "megaloop.cli", "train", "configs/default.yaml", "--set",
                              "parallel.zero_stage=2", "--set", "optim.name=adamw"]


def test_slurm_single_node():
    env = dict(SLURM_JOB_ID="1234", SLURM_GPUS_ON_NODE="4")
    r = _run("launch/slurm/single_node.sbatch", "--dry-run", "configs/default.yaml", env=env)
    assert r.returncode == 0, r.stderr
    assert _cmd(r.stdout) == ["srun", "--nodes", "1", "--ntasks", "1", "--kill-on-bad-exit=1", "torchrun",
                              "--standalone", "--nnodes", "1", "--nproc-per-node", "4", "-m", "megaloop.cli",
                              "train", "configs/default.yaml"]


def test_slurm_multi_node(tmp_path):
    fake = tmp_path / "scontrol"  # stands in for `scontrol show hostnames node[07-08]`
    fake.write_text("#!/bin/sh\necho node07\necho node08\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(SLURM_JOB_ID="20042", SLURM_JOB_NODELIST="node[07-08]", SLURM_NNODES="2", GPUS_PER_NODE="8",
               PATH=f"{tmp_path}:{os.environ['PATH']}")
    r = _run("launch/slurm/multi_node.sbatch", "--dry-run", "configs/default.yaml", "--set", "parallel.pp=2", env=env)
    assert r.returncode == 0, r.stderr
    assert "MASTER_ADDR=node07 MASTER_PORT=20042 NNODES=2 GPUS_PER_NODE=8" in r.stdout
    assert _cmd(r.stdout) == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", "--output",
                              "logs/%x-%j-node%n.out", "torchrun", "--nnodes", "2", "--nproc-per-node", "8",
                              "--rdzv-id", "20042", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node07:20042",
                              "-m", "megaloop.cli", "train", "configs/default.yaml", "--set", "parallel.pp=2"]


def test_slurm_without_allocation_fails_clearly():
    r = _run("launch/slurm/multi_node.sbatch", "--dry-run", "configs/default.yaml")
    assert r.returncode == 2 and "SLURM_JOB_ID is not set" in r.stderr
    r = _run("launch/slurm/multi_node.sbatch", "configs/default.yaml",
             env=dict(SLURM_JOB_ID="5", SLURM_JOB_NODELIST="x[1-2]", SLURM_NNODES="2", PATH="/usr/bin:/bin"))
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr


def test_threads_follow_the_allocation():
    """Contract: inside an allocation, OMP_NUM_THREADS = SLURM_CPUS_PER_TASK / processes (never a
    fixed number) and srun passes --cpus-per-task on; an allocation without GPUs runs one process
    (NPROC=N asks for N gloo processes); an OMP_NUM_THREADS the user set is kept."""
    r = _run("launch/slurm/single_node.sbatch", "--dry-run", "cfg.yaml",
             env=dict(SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32"))
    assert r.returncode == 0, r.stderr
    assert "GPUS_PER_NODE=4 NPROC=4 OMP_NUM_THREADS=8" in r.stdout
    assert _cmd(r.stdout)[:7] == ["srun", "--nodes", "1", "--ntasks", "1", "--cpus-per-task", "32"]
    r = _run("launch/slurm/single_node.sbatch", "--dry-run", "cfg.yaml", env=dict(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="6"))
    assert "GPUS_PER_NODE=0 NPROC=1 OMP_NUM_THREADS=6" in r.stdout
    assert "--nproc-per-node 1 " in r.stdout
    r = _run("launch/slurm/single_node.sbatch", "--dry-run", "cfg.yaml",
             env=dict(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="6", NPROC="2", SLURM_GPUS_PER_NODE="0"))
    assert "NPROC=2 OMP_NUM_THREADS=3" in r.stdout and "--nproc-per-node 2 " in r.stdout
    r = _run("launch/slurm/single_node.sbatch", "--dry-run", "cfg.yaml",
             env=dict(SLURM_JOB_ID="7", SLURM_CPUS_PER_TASK="6", OMP_NUM_THREADS="5"))
    assert "OMP_NUM_THREADS=5" in r.stdout
    r = _run("launch/torchrun.sh", "--dry-run", "--nproc", "2", "cfg.yaml", env=dict(SLURM_CPUS_PER_TASK="5"))
    assert r.stdout.splitlines()[0] == "OMP_NUM_THREADS=2"
    r = _run("launch/torchrun.sh", "--dry-run", "--nproc", "2", "cfg.yaml")  # outside SLURM: torchrun decides
    assert "OMP_NUM_THREADS" not in r.stdout
