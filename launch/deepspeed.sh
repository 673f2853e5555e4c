#!/usr/bin/env bash
# megaloop train under the DeepSpeed launcher, on the nodes of a hostfile (or this node).
#
#   launch/deepspeed.sh [--dry-run] [--hostfile FILE] [--num-gpus G] [--master-addr HOST]
#                       [--master-port PORT] CONFIG [--set key=value ...]
#
# The hostfile lists "hostname slots=G" per node; the launcher reaches the nodes with pdsh/ssh.
# The launcher only starts the processes; parallel.engine=auto picks the engine: DeepSpeed ZeRO for
# AdamW with parallel.zero_stage >= 1 and pp = 1 (TP from parallel.tp), the torch engine otherwise.
set -euo pipefail

DRY_RUN=0
HOSTFILE=""
NUM_GPUS=""
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
need() { [[ $# -ge 3 && "$3" != -* ]] || { echo "launch/deepspeed.sh: $1 needs a value ($2)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --hostfile) need "$1" "a hostfile path" "${@:2}"; HOSTFILE="$2"; shift 2 ;;
    --num-gpus) need "$1" "GPUs per node" "${@:2}"; NUM_GPUS="$2"; shift 2 ;;
    --master-addr) need "$1" "a host name" "${@:2}"; MASTER_ADDR="$2"; shift 2 ;;
    --master-port) need "$1" "a port" "${@:2}"; MASTER_PORT="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: launch/deepspeed.sh [--dry-run] [--hostfile FILE] [--num-gpus G] CONFIG [--set key=value ...]" >&2
  exit 2
fi
if [[ -n "$NUM_GPUS" && ! "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/deepspeed.sh: --num-gpus must be a positive whole number, got '$NUM_GPUS'" >&2
  exit 2
fi
if [[ ! "$MASTER_PORT" =~ ^[0-9]+$ ]]; then
  echo "launch/deepspeed.sh: --master-port must be a port number, got '$MASTER_PORT'" >&2
  exit 2
fi
if [[ -n "$HOSTFILE" && ! -f "$HOSTFILE" && "$DRY_RUN" == 0 ]]; then
  echo "launch/deepspeed.sh: hostfile $HOSTFILE not found (one line per node: 'hostname slots=G')" >&2
  exit 2
fi

cmd=(deepspeed)
[[ -n "$HOSTFILE" ]] && cmd+=(--hostfile "$HOSTFILE")
[[ -n "$NUM_GPUS" ]] && cmd+=(--num_gpus "$NUM_GPUS")
if [[ -n "$HOSTFILE" && -z "$MASTER_ADDR" ]]; then
  MASTER_ADDR=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE" 2>/dev/null || true)
fi
[[ -n "$MASTER_ADDR" ]] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(--master_port "$MASTER_PORT" --module megaloop.cli train "$@")
if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
