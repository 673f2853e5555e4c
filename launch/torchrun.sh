#!/usr/bin/env bash
# megaloop train on one node: one process per GPU (or N CPU processes on gloo) with torchrun.
#
#   launch/torchrun.sh [--dry-run] [--nproc N] CONFIG [--set key=value ...] [--resume]
#
# --nproc defaults to the number of visible GPUs (1 without GPUs). The layout comes from the
# config: parallel.tp x parallel.pp must divide N; the rest is data parallel. Inside a SLURM
# allocation OMP_NUM_THREADS (unless set) is SLURM_CPUS_PER_TASK / N, the allocation's share.
# --dry-run prints the exact command instead of running it.
set -euo pipefail

USAGE="usage: launch/torchrun.sh [--dry-run] [--nproc N] CONFIG [--set key=value ...] [--resume]"
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }

DRY_RUN=0
NPROC="${NPROC:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nproc)
      [[ $# -ge 2 && "$2" != -* ]] || die "--nproc needs a value: the number of processes, e.g. --nproc 4"
      NPROC="$2"; shift 2 ;;
    --nproc=*) NPROC="${1#--nproc=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    --set|--resume) break ;;  # megaloop train's own options
    -*) die "unknown option $1. $USAGE" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 && "$1" != -* ]] || die "no CONFIG given. $USAGE"
if [[ -n "$NPROC" && ! "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  die "--nproc (or NPROC) must be a positive whole number of processes, got '$NPROC'"
fi
if [[ "$DRY_RUN" == 0 && ! -f "$1" ]]; then
  die "config file not found: $1. Pass the path of a YAML file, e.g. configs/default.yaml"
fi
if [[ -z "$NPROC" ]]; then
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$NPROC" -gt 0 ]] || NPROC=1
fi

if [[ -z "${OMP_NUM_THREADS:-}" && -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / NPROC ))
  export OMP_NUM_THREADS=$(( OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1 ))
fi

cmd=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m megaloop.cli train "$@")
if [[ "$DRY_RUN" == 1 ]]; then
  [[ -z "${OMP_NUM_THREADS:-}" ]] || echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
