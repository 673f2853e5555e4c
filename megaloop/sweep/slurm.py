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
    sbatch = f"""#!/bin/bash
# megaloop sweep {manifest.get('name', '')}: {len(rows)} runs, one array task per run.
# Submit with {sweep_abs}/submit.sh (per-run time limits, skips finished, queued and running runs), or directly:
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
IFS=$'\\t' read -r _ NAME GPUS TIME_LIMIT TRUNK <<< "$row"
RUN_DIR="$SWEEP_DIR/runs/$NAME"
CONFIG="$RUN_DIR/config.yaml"
if [ -f "$RUN_DIR/summary.json" ]; then
  echo "megaloop sweep: $NAME is finished (summary.json exists); skipping"
  exit 0
fi
# A live training holds RUN_DIR/.lock (megaloop/run_lock.py): another job is on this run already.
held_elsewhere() {{
  command -v flock >/dev/null 2>&1 && [ -f "$RUN_DIR/.lock" ] && ! flock -n -s "$RUN_DIR/.lock" true
}}
if held_elsewhere; then
  echo "megaloop sweep: $NAME is being trained by another process ($(cat "$RUN_DIR/.lock")); skipping"
  exit 0
fi

cd "$WORKDIR"
set +u  # activation scripts (conda, modules) often read unset variables
{env_setup}
set -u
NPROC=$(( GPUS > 0 ? GPUS : 1 ))  # one process per GPU; a CPU-only run is one threaded process
if [ -z "${{OMP_NUM_THREADS:-}}" ]; then  # threads per process follow the allocation
  OMP_NUM_THREADS=$(( ${{SLURM_CPUS_PER_TASK:-$NPROC}} / NPROC ))
  export OMP_NUM_THREADS=$(( OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1 ))
fi
[ -n "${{MEGALOOP_DRY_RUN:-}}" ] || rm -f "$RUN_DIR/FAILED"
if [ "${{TRUNK:--}}" != "-" ] && [ -z "${{MEGALOOP_DRY_RUN:-}}" ]; then
  # a budget branch: start from its trunk's checkpoint at its decay start (megaloop/sweep/branch.py)
  python -m megaloop.cli sweep branch "$SWEEP_DIR" "$NAME"
fi
TRAIN_ARGS=("$CONFIG" --resume --set "train.run_dir=$RUN_DIR" --set train.progress=false)
if [ -x "$MEGALOOP_ROOT/launch/torchrun.sh" ]; then
  LAUNCH=("$MEGALOOP_ROOT/launch/torchrun.sh" --nproc "$NPROC" "${{TRAIN_ARGS[@]}}")
else
  LAUNCH=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m megaloop.cli train "${{TRAIN_ARGS[@]}}")
fi
if [ "$GPUS" -gt 0 ]; then where="$GPUS GPUs"; else where="CPU only"; fi
echo "megaloop sweep: $NAME on $(hostname) with $where, $NPROC process(es) x $OMP_NUM_THREADS thread(s)," \
  "limit $TIME_LIMIT: ${{LAUNCH[*]}}"
if [ -n "${{MEGALOOP_DRY_RUN:-}}" ]; then  # check what a task would run, without training
  exit 0
fi
rc=0
"${{LAUNCH[@]}}" || rc=$?
if [ "$rc" -ne 0 ]; then
  if held_elsewhere; then  # lost the race to another job: it trains the run, this is no failure
    echo "megaloop sweep: $NAME was started by another process first ($(cat "$RUN_DIR/.lock")); leaving it to it"
    exit 0
  fi
  printf 'exit status %s (SLURM job %s_%s)\nlog: %s/logs/%s_%s.out\n' "$rc" "${{SLURM_ARRAY_JOB_ID:-?}}" \
    "$TASK_ID" "$SWEEP_DIR" "${{SLURM_ARRAY_JOB_ID:-?}}" "$TASK_ID" > "$RUN_DIR/FAILED"
  exit "$rc"
fi
"""
    groups = "\n".join(f"submit {hhmmss(m)} {id_ranges(ids).replace(',', ' ')}" for m, ids in sorted(by_time.items()))
    groups += "".join(f"\nsubmit_branch {hhmmss(m)} {i} {t}" for i, t, m in branches)
    submit = f"""#!/bin/bash
# Submit the runs of sweep {manifest.get('name', '')} that are neither finished nor in the queue, one
# array per time limit. Safe to rerun any time: runs with a summary.json are left out, and so are
# runs whose task is queued or running (squeue lists this user's tasks of this sweep.sbatch); the
# others resume from their last checkpoint.
# Dry run: SBATCH=echo bash {sweep_abs}/submit.sh   (SQUEUE=none: do not ask the queue)
set -euo pipefail
SWEEP_DIR={q(sweep_abs)}
SBATCH="${{SBATCH:-sbatch}}"
SQUEUE="${{SQUEUE:-squeue}}"
mkdir -p "$SWEEP_DIR/logs"
pending=0 finished=0 in_queue=0

# " 3 5 7 ": the array indices of this sweep's tasks that are pending, running or completing
queued=" "
queued_jobs=" "
declare -A jobof=()  # task index -> the array job this call submitted it in
if [ "$SQUEUE" = none ]; then
  echo "megaloop sweep: SQUEUE=none: queued and running tasks are not checked"
elif command -v "$SQUEUE" >/dev/null 2>&1; then
  if ! out=$("$SQUEUE" --noheader --array --user="$(id -un)" --name={q(name)} --format='%K %o %F' 2>&1); then
    echo "megaloop sweep: $SQUEUE failed, so queued runs cannot be told from unfinished ones: $(tail -n 1 <<< "$out")" >&2
    echo "megaloop sweep: fix SLURM and rerun, or rerun with SQUEUE=none to submit every unfinished run" >&2
    exit 1
  fi
  queued=" $(awk -v script="$SWEEP_DIR/sweep.sbatch" '$2 == script {{printf "%s ", $1}}' <<< "$out")"
  # " 3:1234 ": task index -> its array job, for the branches that wait for a queued trunk
  queued_jobs=" $(awk -v script="$SWEEP_DIR/sweep.sbatch" '$2 == script && $3 != "" {{printf "%s:%s ", $1, $3}}' <<< "$out")"
elif [ "$SBATCH" = sbatch ]; then
  echo "megaloop sweep: $SQUEUE not found: run this on a SLURM login node (or set SQUEUE=none)" >&2
  exit 1
else
  echo "megaloop sweep: $SQUEUE not found: queued and running tasks are not checked"
fi

submit() {{  # TIME_LIMIT TASK_ID...
  local limit=$1 ids=() spec id name list
  shift
  for spec in "$@"; do
    for id in $(seq "${{spec%-*}}" "${{spec#*-}}"); do
      name=$(awk -F'\\t' -v id="$id" '$1 == id {{print $2}}' "$SWEEP_DIR/tasks.tsv")
      if [ -f "$SWEEP_DIR/runs/$name/summary.json" ]; then
        finished=$((finished + 1))
      elif [[ "$queued" == *" $id "* ]]; then
        in_queue=$((in_queue + 1))
      else
        ids+=("$id")
      fi
    done
  done
  [ "${{#ids[@]}}" -gt 0 ] || return 0
  pending=$((pending + ${{#ids[@]}}))
  # ids -> SLURM ranges: 0 1 2 5 -> 0-2,5
  list=$(printf '%s\\n' "${{ids[@]}}" | awk 'NR == 1 {{ s = p = $1; next }} $1 == p + 1 {{ p = $1; next }}
    {{ printf "%s%s,", s, (s == p ? "" : "-" p); s = p = $1 }} END {{ printf "%s%s", s, (s == p ? "" : "-" p) }}')
  out=$("$SBATCH" --array="$list{throttle}" --time="$limit" "$SWEEP_DIR/sweep.sbatch")
  echo "$out"
  jid=$(sed -n 's/^Submitted batch job \\([0-9][0-9]*\\).*/\\1/p' <<< "$out")
  for id in "${{ids[@]}}"; do jobof[$id]=${{jid:-?}}; done
}}

submit_branch() {{  # TIME_LIMIT TASK_ID TRUNK_TASK_ID: a budget branch runs after its trunk (afterok)
  local limit=$1 id=$2 trunk=$3 name tname job dep=()
  name=$(awk -F'\\t' -v id="$id" '$1 == id {{print $2}}' "$SWEEP_DIR/tasks.tsv")
  tname=$(awk -F'\\t' -v id="$trunk" '$1 == id {{print $2}}' "$SWEEP_DIR/tasks.tsv")
  if [ -f "$SWEEP_DIR/runs/$name/summary.json" ]; then finished=$((finished + 1)); return 0; fi
  if [[ "$queued" == *" $id "* ]]; then in_queue=$((in_queue + 1)); return 0; fi
  if [ ! -f "$SWEEP_DIR/runs/$tname/summary.json" ]; then
    job=${{jobof[$trunk]:-}}
    if [ -z "$job" ] && [[ "$queued_jobs" == *" $trunk:"* ]]; then
      job=${{queued_jobs#* $trunk:}}; job=${{job%% *}}
    fi
    if [ -z "$job" ]; then
      echo "megaloop sweep: $name branches from $tname, which is neither finished nor queued; submit again once it is"
      return 0
    fi
    dep=(--dependency="afterok:${{job}}_$trunk")
  fi
  pending=$((pending + 1))
  "$SBATCH" --array="$id" --time="$limit" "${{dep[@]}}" "$SWEEP_DIR/sweep.sbatch"
}}

{groups}
echo "megaloop sweep: submitted $pending run(s) of {len(rows)} ($finished finished, $in_queue queued or running)"
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
