#!/usr/bin/env bash
# A single-host SLURM (munge, slurmctld, slurmd with this machine's CPUs) for the `slurm` tests and
# for trying megaloop's SLURM scripts on one machine. It runs under its own config
# ($DIR/slurm.conf, passed to every client through SLURM_CONF), so it never touches /etc/slurm or
# a real cluster this machine may belong to.
#
#   scripts/slurm_local.sh install   apt-get install slurm-wlm and munge when they are missing (root)
#   scripts/slurm_local.sh start     write $DIR/slurm.conf, start munged, slurmctld and slurmd, wait for the node
#   scripts/slurm_local.sh stop      stop slurmd and slurmctld (and munged, when this script started it)
#   scripts/slurm_local.sh status    exit 0 when the controller answers and the node is up
#   eval "$(scripts/slurm_local.sh env)"    then sbatch / squeue / sinfo talk to this cluster
#
# DIR = $MEGALOOP_SLURM_DIR (default /var/tmp/megaloop-slurm); one partition, `debug`, with every
# CPU of this host (no GPUs, no memory limits, no time limit); ports $MEGALOOP_SLURM_PORT (6817)
# and the next one. The daemons run at nice $MEGALOOP_SLURM_NICE (10), and so do their jobs.
# Exit status 3: cannot be done on this machine (not root, no apt-get, daemons not installed);
# any other failure is an error.
set -euo pipefail

DIR="${MEGALOOP_SLURM_DIR:-/var/tmp/megaloop-slurm}"
CONF="$DIR/slurm.conf"
PORT="${MEGALOOP_SLURM_PORT:-6817}"
NICE="${MEGALOOP_SLURM_NICE:-10}"
export SLURM_CONF="$CONF"

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
cannot() { echo "slurm_local.sh: $*" >&2; exit 3; }
have() { command -v "$1" >/dev/null 2>&1; }
need_root() { [[ "$(id -u)" == 0 ]] || cannot "$1 needs root (run it with sudo)"; }

installed() { have sbatch && have slurmctld && have slurmd && have munged && have scontrol; }

install() {
  if installed; then
    echo "slurm_local.sh: slurm-wlm and munge are installed"
    return 0
  fi
  need_root "installing slurm-wlm and munge"
  have apt-get || cannot "apt-get is not available: install slurm-wlm (slurmctld, slurmd, sbatch) and munge by hand"
  echo "slurm_local.sh: installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurm-wlm munge >"$DIR.apt.log" 2>&1 \
    || { apt-get update >>"$DIR.apt.log" 2>&1 \
         && apt-get install -y --no-install-recommends slurm-wlm munge >>"$DIR.apt.log" 2>&1; } \
    || die "apt-get install slurm-wlm munge failed; see $DIR.apt.log"
  installed || die "slurm-wlm installed, but sbatch/slurmctld/slurmd/munged are still missing"
}

munge_ok() { have munge && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  munge_ok && return 0
  [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || die "cannot create /etc/munge/munge.key"; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0755 /run/munge
  if id munge >/dev/null 2>&1 && have runuser; then
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
  else
    munged --force || die "munged did not start (see /var/log/munge/munged.log)"
  fi
  touch "$DIR/munged.started"
  for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  die "munged started but does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
  local node
  # slurmd -C reports this host as SLURM sees it (CPUs, sockets, cores, threads, memory); the
  # config must match it or slurmd refuses to register.
  node=$(slurmd -C | head -n 1)
  [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this host: $node"
  mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log"
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-host test cluster.
ClusterName=megaloop-local
SlurmctldHost=$(hostname -s)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() { scontrol ping 2>/dev/null | grep -q "is UP" \
         && sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

start() {
  if [[ -f "$CONF" ]] && up; then
    echo "slurm_local.sh: already running ($CONF)"
    return 0
  fi
  installed || cannot "slurm is not installed (run: scripts/slurm_local.sh install)"
  need_root "starting slurmctld and slurmd"
  mkdir -p "$DIR"
  start_munge
  write_conf
  pgrep -F "$DIR/slurmctld.pid" >/dev/null 2>&1 || nice -n "$NICE" slurmctld -f "$CONF" \
    || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  pgrep -F "$DIR/slurmd.pid" >/dev/null 2>&1 || nice -n "$NICE" slurmd -f "$CONF" \
    || die "slurmd did not start (see $DIR/log/slurmd.log)"
  for _ in $(seq 150); do
    if up; then
      echo "slurm_local.sh: up: $(sinfo -h -o '%P %D node(s) %c CPUs %T')  (SLURM_CONF=$CONF)"
      return 0
    fi
    sleep 0.2
  done
  tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
  die "the cluster did not come up within 30 s (logs in $DIR/log)"
}

stop_pid() {  # PIDFILE NAME
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  [[ -n "$pid" ]] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "slurm_local.sh: $2 (pid $pid) did not stop; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  [[ -f "$CONF" ]] || { echo "slurm_local.sh: not running (no $CONF)"; return 0; }
  scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
  stop_pid "$DIR/slurmd.pid" slurmd
  stop_pid "$DIR/slurmctld.pid" slurmctld
  if [[ -f "$DIR/munged.started" ]]; then
    stop_pid /run/munge/munged.pid munged
    rm -f "$DIR/munged.started"
  fi
  echo "slurm_local.sh: stopped"
}

case "${1:-}" in
  install) mkdir -p "$(dirname "$DIR")"; install ;;
  start) start ;;
  stop) stop ;;
  status) [[ -f "$CONF" ]] && up ;;
  env) echo "export SLURM_CONF=$(printf '%q' "$CONF")" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
