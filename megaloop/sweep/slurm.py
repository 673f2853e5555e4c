"""`megaloop sweep slurm`: an array job over the manifest, one task per run.

DIR/sweep.sbatch   the array script: task i reads row i of DIR/tasks.tsv, exits at once when the run
                   has a summary.json or its run directory is locked by a live training, else
                   launches `megaloop train CONFIG --resume` on one node through launch/torchrun.sh
                   (plain torchrun where that launcher is missing): one process per GPU, or one
                   process on a CPU-only array (--gpus-per-node 0), with OMP_NUM_THREADS =
                   SLURM_CPUS_PER_TASK / processes; MEGALOOP_DRY_RUN=1 prints the launch command instead
DIR/tasks.tsv      index, run, GPUs, time limit (what the script reads; no Python needed on the node)
DIR/submit.sh      submits the runs that are neither finished (summary.json) nor queued or running
                   (squeue: this user's tasks of this sweep's sweep.sbatch), one array per time
                   limit, so every run gets its own time from the manifest (a SLURM array has one
                   --time for all tasks); rerun it any time: the others resume from their last
                   complete checkpoint
DIR/logs/%A_%a.out one log per task

Time per run = FLOPs / (GPUs x peak TFLOP/s x MFU) x safety + fixed overhead (start-up, eval,
checkpoints), rounded up to whole quarter hours so runs of similar cost share one submission; on a
CPU-only array the peak is CPUs per task x --tflops-per-cpu.
"""
from __future__ import annotations

import math
import os
import shlex
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..config import ConfigError
from .plan import read_manifest


@dataclass
class SlurmOptions:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: Optional[int] = None      # None = the manifest's GPUs per run; 0 = CPU-only array
    cpus_per_gpu: int = 8
    cpus_per_task: Optional[int] = None      # None = cpus_per_gpu x GPUs (cpus_per_gpu on a CPU-only array)
    mem: Optional[str] = None                # e.g. 0 (all of the node) or 512G
    max_parallel: Optional[int] = None       # array throttle: at most N tasks at once
    tflops_per_gpu: float = 400.0            # dense bf16 peak assumed per GPU
    # fp32 peak assumed per CPU core: with mfu 0.4 that is 40 GFLOP/s sustained, about what a
    # 2-core Xeon reaches on configs/default.yaml (35 GFLOP/s per core)
    tflops_per_cpu: float = 0.1
    mfu: float = 0.4
    safety: float = 1.5                      # multiply the estimate (eval, slow nodes, restarts)
    overhead_min: float = 10.0               # start-up, data loading, final eval, checkpoints
    env_setup: Optional[str] = None          # e.g. "module load cuda/12.4; source ~/venv/bin/activate"
    extra_sbatch: list[str] = field(default_factory=list)
    job_name: Optional[str] = None


def cpus_per_task(gpus: int, opts: SlurmOptions) -> int:
    return opts.cpus_per_task or opts.cpus_per_gpu * max(gpus, 1)


def run_minutes(flops: float, gpus: int, opts: SlurmOptions) -> int:
    peak = gpus * opts.tflops_per_gpu if gpus else cpus_per_task(0, opts) * opts.tflops_per_cpu
    seconds = flops / (peak * 1e12 * opts.mfu)
    minutes = seconds / 60 * opts.safety + opts.overhead_min
    return int(math.ceil(minutes / 15) * 15)


def hhmmss(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def id_ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (SLURM --array syntax; keeps the command line short)."""
    parts, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def default_env_setup() -> str:
    """Activate the Python environment `megaloop` runs from now, when it is a virtual environment."""
    if sys.prefix != sys.base_prefix and os.path.isfile(os.path.join(sys.prefix, "bin", "activate")):
        return f"source {shlex.quote(os.path.join(sys.prefix, 'bin', 'activate'))}"
    return "# (no virtual environment detected: pass --env-setup to activate one)"


def _check(opts: SlurmOptions) -> None:
    for name in ("tflops_per_gpu", "tflops_per_cpu", "mfu", "safety"):
        if not getattr(opts, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(opts, name)}")
    if opts.mfu > 1:
        raise ConfigError(f"--mfu is a fraction of peak (0 < mfu <= 1), got {opts.mfu}")
    if opts.gpus_per_node is not None and opts.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0 (0: a CPU-only array), got {opts.gpus_per_node}")
    for name in ("cpus_per_gpu", "cpus_per_task"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if opts.max_parallel is not None and opts.max_parallel < 1:
        raise ConfigError(f"--max-parallel must be >= 1, got {opts.max_parallel}")
    for line in opts.extra_sbatch:
        if "\n" in line:
            raise ConfigError(f"--sbatch takes one option per flag, got {line!r}")


def check_partition(partition: Optional[str]) -> Optional[str]:
    """Where SLURM is installed, refuse a partition the cluster does not have (ConfigError). Returns a
    note when the partitions cannot be listed (sinfo failed), None otherwise."""
    if partition is None or shutil.which("sbatch") is None:
        return None
    try:
        res = subprocess.run(["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"note: could not list the partitions to check --partition={partition} ({e})"
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return f"note: could not list the partitions to check --partition={partition} (sinfo: {why})"
    names = sorted(set(res.stdout.split()))
    if partition not in names:
        raise ConfigError(f"--partition={partition}: this cluster has no such partition (sinfo lists: "
                          f"{', '.join(names) or 'none'}); pass one of them")
    return None



TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


def fill_template(file_name: str, values: dict[str, str]) -> str:
    """The bash script templates/FILE_NAME with every @key@ replaced by values[key] (bash keeps its
    own $ and braces, so the scripts read as the shell files they are)."""
    with open(os.path.join(TEMPLATES, file_name)) as f:
        text = f.read()
    return re.sub(r"@([a-z_]+)@", lambda m: values[m.group(1)], text)

def render(sweep_dir: str, opts: SlurmOptions) -> dict[str, str]:
    """{file name: text} for sweep.sbatch, tasks.tsv and submit.sh (nothing written here)."""
    _check(opts)
    manifest = read_manifest(sweep_dir)
    rows = manifest["runs"]
    sweep_abs = os.path.abspath(sweep_dir)
    workdir = manifest.get("workdir") or os.getcwd()
    tasks, by_time, branches = [], {}, []
    gpu_counts = set()
    index = {row["run"]: i for i, row in enumerate(rows)}
    for i, row in enumerate(rows):
        gpus = opts.gpus_per_node if opts.gpus_per_node is not None else int(row.get("gpus", 1))
        gpu_counts.add(gpus)
        # a branch (megaloop/sweep/branch.py) trains its decay only, after its trunk's job
        trunk = index.get(row.get("branch_from") or "")
        minutes = run_minutes(float(row.get("spent_flops") or row["target_flops"]), gpus, opts)
        tasks.append(f"{i}\t{row['run']}\t{gpus}\t{hhmmss(minutes)}\t{'-' if trunk is None else trunk}")
        if trunk is None:
            by_time.setdefault(minutes, []).append(i)
        else:
            branches.append((i, trunk, minutes))
    if len(gpu_counts) > 1:
        raise ConfigError(f"the manifest mixes GPUs per run ({sorted(gpu_counts)}); one array needs one node "
                          f"shape: pass --gpus-per-node N")
    gpus = gpu_counts.pop()
    throttle = f"%{opts.max_parallel}" if opts.max_parallel else ""
    name = opts.job_name or f"megaloop-{manifest.get('name', 'sweep')}"
    q = shlex.quote
    directives = [f"--job-name={name}", f"--array=0-{len(rows) - 1}{throttle}", "--nodes=1", "--ntasks-per-node=1"]
    directives += [f"--gpus-per-node={gpus}"] if gpus else []  # 0: a CPU-only array requests no GPUs
    directives += [f"--cpus-per-task={cpus_per_task(gpus, opts)}", f"--time={hhmmss(max(by_time))}",
                   f"--output={sweep_abs}/logs/%A_%a.out", f"--error={sweep_abs}/logs/%A_%a.out"]
    for key in ("partition", "account", "qos", "mem"):
        if getattr(opts, key) is not None:
            directives.append(f"--{key}={getattr(opts, key)}")
    directives += opts.extra_sbatch
    env_setup = opts.env_setup or default_env_setup()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    groups = "\n".join(f"submit {hhmmss(m)} {id_ranges(ids).replace(',', ' ')}" for m, ids in sorted(by_time.items()))
    groups += "".join(f"\nsubmit_branch {hhmmss(m)} {i} {t}" for i, t, m in branches)
    values = {"sweep_name": manifest.get("name", ""), "n_runs": str(len(rows)), "sweep_dir": sweep_abs,
              "sweep_dir_q": q(sweep_abs), "workdir_q": q(workdir), "repo_q": q(repo), "env_setup": env_setup,
              "directives": "\n".join("#SBATCH " + d for d in directives), "job_name_q": q(name),
              "throttle": throttle, "groups": groups}
    sbatch, submit = (fill_template(f, values) for f in ("sweep.sbatch.in", "submit.sh.in"))
    return {"sweep.sbatch": sbatch, "tasks.tsv": "\n".join(tasks) + "\n", "submit.sh": submit}


def write_slurm(sweep_dir: str, opts: SlurmOptions) -> dict[str, str]:
    """Render and write the files; returns {file name: path}."""
    files = render(sweep_dir, opts)
    os.makedirs(os.path.join(sweep_dir, "logs"), exist_ok=True)
    out = {}
    for name, text in files.items():
        path = os.path.join(sweep_dir, name)
        with open(path, "w") as f:
            f.write(text)
        if name.endswith((".sh", ".sbatch")):
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        out[name] = path
    return out
