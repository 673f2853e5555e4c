#!/usr/bin/env bash
# megaloop train with torchrun: one process per GPU (or N CPU processes on gloo) on each node.
#
#   launch/torchrun.sh [--dry-run] [--nproc N] CONFIG [--set key=value ...] [--resume]
#   launch/torchrun.sh [--nproc N] --nnodes M --rdzv-endpoint HOST[:PORT] [--rdzv-id ID] CONFIG ...
#
# --nproc defaults to the number of visible GPUs (1 without GPUs). The layout comes from the
# config: parallel.tp x parallel.pp must divide N x M; the rest is data parallel. Inside a SLURM
# allocation OMP_NUM_THREADS (unless set) is SLURM_CPUS_PER_TASK / N, the allocation's share.
# --dry-run prints the exact command (and the variables this script sets) instead of running it.
#
# Several nodes (--nnodes M > 1): run the same command on every node; the nodes meet at torchrun's
# c10d rendezvous on HOST (one of them; PORT defaults to 29400), whose launcher also hosts the
# job's key-value store (MASTER_ADDR=HOST, MASTER_PORT=PORT for the ranks). The endpoint defaults to
# $MASTER_ADDR:$MASTER_PORT when MASTER_ADDR is set. The rendezvous id (--rdzv-id, default
# $SLURM_JOB_ID or "megaloop") must be the same on every node. Before torchrun starts, this script
# checks, each a clear error (status 2) instead of a hang: HOST resolves here; on HOST, nothing
# listens on PORT yet; the network interface the collectives use exists, is up, has an IPv4
# address and is not the loopback. That interface is GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME when
# set (either one; a comma list is checked item by item), else the interface that reaches HOST
# (on HOST: the one holding its address), exported as both. A rank that fails, or a node that
# stops answering, ends the job (--max-restarts 0, MAX_RESTARTS to change): resume with --resume.
set -euo pipefail

USAGE="usage: launch/torchrun.sh [--dry-run] [--nproc N] [--nnodes M --rdzv-endpoint HOST[:PORT] [--rdzv-id ID]] CONFIG [--set key=value ...] [--resume]"
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }

DRY_RUN=0
NPROC="${NPROC:-}"
NNODES=1
ENDPOINT=""
RDZV_ID="${SLURM_JOB_ID:-megaloop}"
value() { [[ $# -ge 2 && -n "$2" && "$2" != -* ]] || die "$1 needs a value. $USAGE"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nproc)
      [[ $# -ge 2 && "$2" != -* ]] || die "--nproc needs a value: the number of processes, e.g. --nproc 4"
      NPROC="$2"; shift 2 ;;
    --nproc=*) NPROC="${1#--nproc=}"; shift ;;
    --nnodes) value "$@"; NNODES="$2"; shift 2 ;;
    --nnodes=*) NNODES="${1#--nnodes=}"; shift ;;
    --rdzv-endpoint) value "$@"; ENDPOINT="$2"; shift 2 ;;
    --rdzv-endpoint=*) ENDPOINT="${1#--rdzv-endpoint=}"; shift ;;
    --rdzv-id) value "$@"; RDZV_ID="$2"; shift 2 ;;
    --rdzv-id=*) RDZV_ID="${1#--rdzv-id=}"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
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

[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive whole number of nodes, got '$NNODES'"

# ---- several nodes: the rendezvous endpoint and the network interface, checked before torchrun
iface_ok() {  # iface_ok IF: why IF cannot carry the collectives to other nodes (empty: it can)
  local f="/sys/class/net/$1"
  if [[ ! -e "$f" ]]; then
    echo "there is no interface '$1' on this host ($(hostname)); it has: $(ls /sys/class/net | tr '\n' ' ')"
  elif (( $(cat "$f/flags") & 0x8 )); then
    echo "'$1' is the loopback interface: the other nodes cannot reach this host through it"
  elif (( ! ($(cat "$f/flags") & 0x1) )); then
    echo "'$1' is down"
  elif [[ -z "$(ip -o -4 addr show dev "$1" 2>/dev/null)" ]]; then
    echo "'$1' has no IPv4 address"
  fi
}
exported=()
if [[ "$NNODES" -gt 1 ]]; then
  if [[ -z "$ENDPOINT" && -n "${MASTER_ADDR:-}" ]]; then ENDPOINT="$MASTER_ADDR:${MASTER_PORT:-29400}"; fi
  [[ -n "$ENDPOINT" ]] || die "--nnodes $NNODES needs the rendezvous endpoint: --rdzv-endpoint HOST[:PORT], HOST being \
one of the nodes (the same on every node), or export MASTER_ADDR (and MASTER_PORT)"
  RDZV_HOST="${ENDPOINT%:*}"; RDZV_PORT=29400
  [[ "$ENDPOINT" != *:* ]] && RDZV_HOST="$ENDPOINT" || RDZV_PORT="${ENDPOINT##*:}"
  [[ "$RDZV_PORT" =~ ^[0-9]+$ && "$RDZV_PORT" -ge 1 && "$RDZV_PORT" -le 65535 ]] \
    || die "rendezvous port must be a number from 1 to 65535, got '$RDZV_PORT' (--rdzv-endpoint $ENDPOINT)"
  RDZV_ADDR=$(getent ahostsv4 "$RDZV_HOST" 2>/dev/null | awk 'NR == 1 {print $1}' || true)
  [[ -n "$RDZV_ADDR" ]] || die "rendezvous host '$RDZV_HOST' does not resolve on $(hostname) (getent ahostsv4 \
$RDZV_HOST): use a host name every node resolves (DNS or /etc/hosts) or its IPv4 address"
  if command -v ip >/dev/null; then
    local_dev=$(ip -o -4 addr show to "$RDZV_ADDR/32" 2>/dev/null | awk 'NR == 1 {print $2}')
    if [[ -n "$local_dev" && "$DRY_RUN" == 0 ]] && (exec 3<>"/dev/tcp/$RDZV_ADDR/$RDZV_PORT") 2>/dev/null; then
      die "port $RDZV_PORT of the rendezvous host $RDZV_HOST ($RDZV_ADDR, this host) is taken by another \
program: pick a free port in --rdzv-endpoint $RDZV_HOST:PORT (the same on every node)"
    fi
    if [[ -n "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]]; then
      for var in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
        IFS=, read -ra ifs <<<"${!var:-}"
        for i in "${ifs[@]}"; do
          i="${i#=}"; i="${i#^}"  # NCCL's prefix forms: =exact, ^exclude
          [[ -n "$i" && "${!var}" != ^* ]] || continue
          why=$(iface_ok "$i")
          [[ -z "$why" ]] || die "$var=${!var}: $why. Unset it (this script then picks the interface that reaches \
$RDZV_HOST) or name the interface of this host's network to the other nodes"
        done
      done
    else
      dev="$local_dev"
      [[ -n "$dev" ]] || dev=$(ip -o route get "$RDZV_ADDR" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
      [[ -n "$dev" ]] || die "no route from $(hostname) to the rendezvous host $RDZV_HOST ($RDZV_ADDR)"
      why=$(iface_ok "$dev")
      [[ -z "$why" ]] || die "the interface towards the rendezvous host $RDZV_HOST ($RDZV_ADDR) cannot carry the \
collectives: $why. With --nnodes > 1 the endpoint must be an address the other nodes reach (not 127.0.0.1/localhost)"
      export GLOO_SOCKET_IFNAME="$dev" NCCL_SOCKET_IFNAME="$dev"
      exported=("GLOO_SOCKET_IFNAME=$dev" "NCCL_SOCKET_IFNAME=$dev")
    fi
  fi
  cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d
       --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RDZV_ID" --max-restarts "${MAX_RESTARTS:-0}"
       -m megaloop.cli train "$@")
else
  cmd=(torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m megaloop.cli train "$@")
fi
if [[ "$DRY_RUN" == 1 ]]; then
  [[ -z "${OMP_NUM_THREADS:-}" ]] || echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
  for e in "${exported[@]}"; do echo "$e"; done
  printf '%q ' "${cmd[@]}"; echo
elif [[ "$NNODES" == 1 ]]; then
  exec "${cmd[@]}"
else
  # torchrun's agent talks to the rendezvous host's store; when that host is cut off, the agent can
  # wait in a store call long after its ranks ended (their watchdog stops them within seconds).
  # So: once the ranks this node started are all gone, the agent gets AGENT_GRACE_S (10) to exit.
  "${cmd[@]}" &
  agent=$!
  trap 'kill -TERM "$agent" 2>/dev/null' TERM INT HUP
  children() {  # the agent's live children (a stuck agent leaves its ended ranks as zombies)
    local c
    for c in $(cat /proc/"$agent"/task/*/children 2>/dev/null); do
      [[ "$(awk '{print $3}' /proc/"$c"/stat 2>/dev/null)" =~ ^[RSDT]$ ]] && echo "$c"
    done
  }
  (
    had=0; gone=0
    while kill -0 "$agent" 2>/dev/null; do
      if [[ -n "$(children)" ]]; then had=1; gone=0; elif [[ "$had" == 1 ]]; then gone=$((gone + 1)); fi
      if (( gone > ${AGENT_GRACE_S:-10} * 2 )); then
        echo "launch/torchrun.sh: torchrun was still running ${AGENT_GRACE_S:-10} s after the ranks of this node \
($(hostname)) ended (the rendezvous host $RDZV_HOST unreachable?): stopped it" >&2
        kill -KILL "$agent" 2>/dev/null
        exit 0
      fi
      sleep 0.5
    done
  ) &
  guard=$!
  rc=0
  while :; do
    wait "$agent" && rc=0 || rc=$?
    kill -0 "$agent" 2>/dev/null || break  # a trapped signal interrupted the wait: wait again
  done
  kill "$guard" 2>/dev/null || true
  wait "$guard" 2>/dev/null || true
  exit "$rc"
fi
