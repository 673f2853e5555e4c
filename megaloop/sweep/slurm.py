"""`megaloop sweep slurm`: an array job over the manifest, one task per run.

DIR/sweep.sbatch   the array script: task i reads row i of DIR/tasks.tsv, exits at once when the run
                   has a summary.json, else launches `megaloop train CONFIG --resume` on one node
                   through launch/torchrun.sh (plain torchrun where that launcher is missing);
                   MEGALOOP_DRY_RUN=1 prints the launch command instead
DIR/tasks.tsv      index, run, GPUs, time limit (what the script reads; no Python needed on the node)
DIR/submit.sh      submits only the unfinished runs, one array per time limit, so every run gets
                   its own time from the manifest (a SLURM array has one --time for all tasks);
                   rerun it after failures or preemption: finished runs are skipped, the others
                   resume from their last complete checkpoint
DIR/logs/%A_%a.out one log per task

Time per run = FLOPs / (GPUs x peak TFLOP/s x MFU) x safety + fixed overhead (start-up, eval,
checkpoints), rounded up to whole quarter hours so runs of similar cost share one submission.
"""
from __future__ import annotations

import math
import os
import shlex
import stat
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
    gpus_per_node: Optional[int] = None      # None = the manifest's GPUs per run
    cpus_per_gpu: int = 8
    mem: Optional[str] = None                # e.g. 0 (all of the node) or 512G
    max_parallel: Optional[int] = None       # array throttle: at most N tasks at once
    tflops_per_gpu: float = 400.0            # dense bf16 peak assumed per GPU
    mfu: float = 0.4
    safety: float = 1.5                      # multiply the estimate (eval, slow nodes, restarts)
    overhead_min: float = 10.0               # start-up, data loading, final eval, checkpoints
    env_setup: Optional[str] = None          # e.g. "module load cuda/12.4; source ~/venv/bin/activate"
    extra_sbatch: list[str] = field(default_factory=list)
    job_name: Optional[str] = None


def run_minutes(flops: float, gpus: int, opts: SlurmOptions) -> int:
    seconds = flops / (gpus * opts.tflops_per_gpu * 1e12 * opts.mfu)
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
    for name in ("tflops_per_gpu", "mfu", "safety"):
        if not getattr(opts, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(opts, name)}")
    if opts.mfu > 1:
        raise ConfigError(f"--mfu is a fraction of peak (0 < mfu <= 1), got {opts.mfu}")
    if opts.gpus_per_node is not None and opts.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {opts.gpus_per_node}")
    if opts.max_parallel is not None and opts.max_parallel < 1:
        raise ConfigError(f"--max-parallel must be >= 1, got {opts.max_parallel}")
    for line in opts.extra_sbatch:
        if "\n" in line:
            raise ConfigError(f"--sbatch takes one option per flag, got {line!r}")


def render(sweep_dir: str, opts: SlurmOptions) -> dict[str, str]:
    """{file name: text} for sweep.sbatch, tasks.tsv and submit.sh (nothing written here)."""
    _check(opts)
    manifest = read_manifest(sweep_dir)
    rows = manifest["runs"]
    sweep_abs = os.path.abspath(sweep_dir)
    workdir = manifest.get("workdir") or os.getcwd()
    tasks, by_time = [], {}
    gpu_counts = set()
    for i, row in enumerate(rows):
        gpus = opts.gpus_per_node or int(row.get("gpus", 1))
        gpu_counts.add(gpus)
        minutes = run_minutes(float(row["target_flops"]), gpus, opts)
        tasks.append(f"{i}\t{row['run']}\t{gpus}\t{hhmmss(minutes)}")
        by_time.setdefault(minutes, []).append(i)
    if len(gpu_counts) > 1:
        raise ConfigError(f"the manifest mixes GPUs per run ({sorted(gpu_counts)}); one array needs one node "
                          f"shape: pass --gpus-per-node N")
    gpus = gpu_counts.pop()
    throttle = f"%{opts.max_parallel}" if opts.max_parallel else ""
    name = opts.job_name or f"megaloop-{manifest.get('name', 'sweep')}"
    q = shlex.quote
    directives = [f"--job-name={name}", f"--array=0-{len(rows) - 1}{throttle}", "--nodes=1",
                  "--ntasks-per-node=1", f"--gpus-per-node={gpus}", f"--cpus-per-task={opts.cpus_per_gpu * gpus}",
                  f"--time={hhmmss(max(by_time))}", f"--output={sweep_abs}/logs/%A_%a.out",
                  f"--error={sweep_abs}/logs/%A_%a.out"]
    for key in ("partition", "account", "qos", "mem"):
        if getattr(opts, key) is not None:
            directives.append(f"--{key}={getattr(opts, key)}")
    directives += opts.extra_sbatch
    env_setup = opts.env_setup or default_env_setup()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sbatch = f"""#!/bin/bash
# megaloop sweep {manifest.get('name', '')}: {len(rows)} runs, one array task per run.
# Submit with {sweep_abs}/submit.sh (per-run time limits, skips finished runs), or directly:
#   sbatch {sweep_abs}/sweep.sbatch        (every task gets the longest run's time limit)
{chr(10).join('#SBATCH ' + d for d in directives)}
set -euo pipefail

SWEEP_DIR={q(sweep_abs)}
WORKDIR={q(workdir)}          # where the sweep was planned: relative data paths resolve here
MEGALOOP_ROOT={q(repo)}   # for the launchers in launch/
TASK_ID="${{SLURM_ARRAY_TASK_ID:?run this script as a SLURM array task (sbatch), or set SLURM_ARRAY_TASK_ID}}"

row=$(awk -F'\\t' -v id="$TASK_ID" '$1 == id' "$SWEEP_DIR/tasks.tsv")
if [ -z "$row" ]; then
  echo "megaloop sweep: no run with index $TASK_ID in $SWEEP_DIR/tasks.tsv" >&2
  exit 1
fi
IFS=$'\\t' read -r _ NAME GPUS TIME_LIMIT <<< "$row"
RUN_DIR="$SWEEP_DIR/runs/$NAME"
CONFIG="$RUN_DIR/config.yaml"
if [ -f "$RUN_DIR/summary.json" ]; then
  echo "megaloop sweep: $NAME is finished (summary.json exists); skipping"
  exit 0
fi

cd "$WORKDIR"
set +u  # activation scripts (conda, modules) often read unset variables
{env_setup}
set -u
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{opts.cpus_per_gpu}}}"
[ -n "${{MEGALOOP_DRY_RUN:-}}" ] || rm -f "$RUN_DIR/FAILED"
TRAIN_ARGS=("$CONFIG" --resume --set "train.run_dir=$RUN_DIR" --set train.progress=false)
if [ -x "$MEGALOOP_ROOT/launch/torchrun.sh" ]; then
  LAUNCH=("$MEGALOOP_ROOT/launch/torchrun.sh" --nproc "$GPUS" "${{TRAIN_ARGS[@]}}")
else
  LAUNCH=(torchrun --standalone --nnodes 1 --nproc-per-node "$GPUS" -m megaloop.cli train "${{TRAIN_ARGS[@]}}")
fi
echo "megaloop sweep: $NAME on $(hostname) with $GPUS GPUs, limit $TIME_LIMIT: ${{LAUNCH[*]}}"
if [ -n "${{MEGALOOP_DRY_RUN:-}}" ]; then  # check what a task would run, without training
  exit 0
fi
rc=0
"${{LAUNCH[@]}}" || rc=$?
if [ "$rc" -ne 0 ]; then
  printf 'exit status %s (SLURM job %s_%s)\\nlog: %s/logs/%s_%s.out\\n' "$rc" "${{SLURM_ARRAY_JOB_ID:-?}}" \\
    "$TASK_ID" "$SWEEP_DIR" "${{SLURM_ARRAY_JOB_ID:-?}}" "$TASK_ID" > "$RUN_DIR/FAILED"
  exit "$rc"
fi
"""
    groups = "\n".join(f"submit {hhmmss(m)} {id_ranges(ids).replace(',', ' ')}" for m, ids in sorted(by_time.items()))
    submit = f"""#!/bin/bash
# Submit the unfinished runs of sweep {manifest.get('name', '')}, one array per time limit.
# Safe to rerun: runs with a summary.json are left out; the others resume from their last checkpoint.
# Dry run: SBATCH=echo bash {sweep_abs}/submit.sh
set -euo pipefail
SWEEP_DIR={q(sweep_abs)}
SBATCH="${{SBATCH:-sbatch}}"
mkdir -p "$SWEEP_DIR/logs"
pending=0

submit() {{  # TIME_LIMIT TASK_ID...
  local limit=$1 ids=() spec id name list
  shift
  for spec in "$@"; do
    for id in $(seq "${{spec%-*}}" "${{spec#*-}}"); do
      name=$(awk -F'\\t' -v id="$id" '$1 == id {{print $2}}' "$SWEEP_DIR/tasks.tsv")
      [ -f "$SWEEP_DIR/runs/$name/summary.json" ] || ids+=("$id")
    done
  done
  [ "${{#ids[@]}}" -gt 0 ] || return 0
  pending=$((pending + ${{#ids[@]}}))
  # ids -> SLURM ranges: 0 1 2 5 -> 0-2,5
  list=$(printf '%s\\n' "${{ids[@]}}" | awk 'NR == 1 {{ s = p = $1; next }} $1 == p + 1 {{ p = $1; next }}
    {{ printf "%s%s,", s, (s == p ? "" : "-" p); s = p = $1 }} END {{ printf "%s%s", s, (s == p ? "" : "-" p) }}')
  "$SBATCH" --array="$list{throttle}" --time="$limit" "$SWEEP_DIR/sweep.sbatch"
}}

{groups}
echo "megaloop sweep: submitted $pending unfinished run(s) of {len(rows)}"
"""
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
