#!/usr/bin/env bash
# A cluster of N test hosts on this machine, for the multi-node tests (tests/test_multihost*.py) and
# for trying megaloop's multi-node launch by hand. Each host is a network namespace with its own
# interface (eth0), its own host name (a UTS namespace) and its own /etc/hosts and mounts (a mount
# namespace); the hosts are joined by a bridge that lives in a namespace of its own (the switch).
# Every address is in 127.77.0.0/24 and is assigned here, inside these namespaces: the hosts have
# no route to anything else, and the machine's own network namespace is never touched.
#
#   scripts/testcluster.sh up NAME N        make hosts NAME-h0 .. NAME-h{N-1} (127.77.0.1 .. N)
#   scripts/testcluster.sh exec NAME I CMD  run CMD on host I (its network, host name, mounts)
#   scripts/testcluster.sh link NAME I down|up   pull / plug host I's cable at the switch
#   scripts/testcluster.sh kill NAME I      SIGKILL every process running on host I (the host stays)
#   scripts/testcluster.sh ro NAME I DIR    DIR becomes read-only for host I only
#   scripts/testcluster.sh rw NAME I DIR    undo `ro`
#   scripts/testcluster.sh slurm NAME       start SLURM on the hosts: slurmctld on host 0, one slurmd per
#                                           host (NodeName NAME-hI, NodeAddr its address, 2 CPUs each,
#                                           partition `debug`); prints SLURM_CONF=... for clients, which
#                                           must run on a host (`exec NAME 0 sbatch ...`)
#   scripts/testcluster.sh down NAME        kill everything on the hosts, delete the namespaces
#   scripts/testcluster.sh status NAME      the hosts, their addresses and processes
#
# Needs root and `ip netns` (iproute2), unshare and nsenter (util-linux). Exit status 3: cannot be
# done on this machine. `up` undoes what it made when it fails; `down` is safe to repeat.
set -euo pipefail

STATE_ROOT="${MEGALOOP_TESTCLUSTER_DIR:-/run/megaloop-testcluster}"
SUBNET=127.77.0

die() { echo "testcluster.sh: $*" >&2; exit 1; }
cannot() { echo "testcluster.sh: $*" >&2; exit 3; }
usage() { sed -n '9,21p' "$0" >&2; exit 2; }

check_name() {
  [[ "$1" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "cluster NAME must be 1-8 lower-case letters/digits starting with a letter, got '$1'"
}
host_ns() { echo "mlc-$1-h$2"; }
switch_ns() { echo "mlc-$1-sw"; }
holder() {  # the pid of the process that holds host I's UTS and mount namespaces
  local f="$STATE_ROOT/$1/h$2.pid"
  [[ -s "$f" ]] || die "no host $2 in cluster $1 (scripts/testcluster.sh up $1 N)"
  cat "$f"
}
nhosts() { cat "$STATE_ROOT/$1/n" 2>/dev/null || echo 0; }

preflight() {
  [[ "$(id -u)" == 0 ]] || cannot "needs root (network namespaces)"
  for t in ip unshare nsenter; do command -v "$t" >/dev/null || cannot "$t is not installed"; done
  ip netns list >/dev/null 2>&1 || cannot "ip netns does not work here"
}

up() {
  local name="$1" n="$2" dir="$STATE_ROOT/$1"
  [[ "$n" =~ ^[2-9]$|^[1-9][0-9]$ ]] || die "N must be a number of hosts from 2 to 99, got '$n'"
  preflight
  [[ ! -e "$dir" ]] || die "cluster $name exists already ($dir): scripts/testcluster.sh down $name"
  mkdir -p "$dir"
  echo "$n" >"$dir/n"
  trap 'echo "testcluster.sh: up failed; removing what it made" >&2; down "$name" >/dev/null 2>&1 || true' ERR
  local sw; sw=$(switch_ns "$name")
  ip netns add "$sw"
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  {
    echo "127.0.0.1 localhost"
    for ((i = 0; i < n; i++)); do echo "$SUBNET.$((i + 1)) $name-h$i"; done
  } >"$dir/hosts"
  : >"$dir/resolv.conf"  # no name server: a name outside /etc/hosts fails at once, nothing is asked
  for ((i = 0; i < n; i++)); do
    local ns; ns=$(host_ns "$name" "$i")
    ip netns add "$ns"
    ip link add eth0 netns "$ns" type veth peer name "p$i" netns "$sw"
    ip -n "$sw" link set "p$i" master br0
    ip -n "$sw" link set "p$i" up
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.route_localnet=1
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.eth0.route_localnet=1
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    # The host's own host name and files: a UTS and mount namespace held by a sleeping process.
    # In it, a /sys mounted from inside the host's network (so /sys/class/net lists its own
    # interfaces), with this machine's cgroup tree bound back in (slurmd needs it).
    rm -f "$dir/h$i.pid"
    mkdir -p "$dir/cgroup-h$i"
    unshare --uts --mount --propagation private sh -c '
      mount --rbind /sys/fs/cgroup "$2/cgroup-h$3"
      exec nsenter --net="/run/netns/$4" sh -c "
        mount -t sysfs sysfs /sys && mount --rbind \"\$2/cgroup-h\$3\" /sys/fs/cgroup || exit 1
        hostname \"\$1\"; mount --bind \"\$2/hosts\" /etc/hosts; mount --bind \"\$2/resolv.conf\" /etc/resolv.conf
        echo \$\$ >\"\$2/h\$3.pid.tmp\"; mv \"\$2/h\$3.pid.tmp\" \"\$2/h\$3.pid\"; exec sleep infinity" sh "$1" "$2" "$3"
    ' sh "$name-h$i" "$dir" "$i" "$ns" </dev/null >/dev/null 2>&1 &
  done
  local t
  for ((i = 0; i < n; i++)); do
    for ((t = 0; t < 100; t++)); do [[ -s "$dir/h$i.pid" ]] && break; sleep 0.05; done
    [[ -s "$dir/h$i.pid" ]] || die "host $i did not start"
  done
  trap - ERR
  for ((i = 0; i < n; i++)); do echo "$name-h$i $SUBNET.$((i + 1))"; done
}

in_host() {  # in_host NAME I CMD...: CMD inside host I's network, UTS and mount namespaces
  local pid; pid=$(holder "$1" "$2"); shift 2
  exec nsenter -t "$pid" --net --uts --mount --wdns="$PWD" -- "$@"
}

host_pids() {  # every process inside host I's network namespace but its holder
  local ns pid; ns=$(host_ns "$1" "$2"); pid=$(cat "$STATE_ROOT/$1/h$2.pid" 2>/dev/null || echo -)
  ip netns pids "$ns" 2>/dev/null | grep -vx "$pid" || true
}

kill_host() {
  local round pids
  for round in 1 2 3 4 5; do  # again, for processes started while the first ones died
    pids=$(host_pids "$1" "$2")
    [[ -n "$pids" ]] || return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
}

link() {
  [[ "$3" == up || "$3" == down ]] || die "link NAME I down|up"
  [[ -s "$STATE_ROOT/$1/h$2.pid" ]] || die "no host $2 in cluster $1"
  ip -n "$(switch_ns "$1")" link set "p$2" "$3"
}

readonly_dir() {  # bind DIR onto itself, read-only, in host I's mount namespace only
  local pid; pid=$(holder "$1" "$2")
  [[ -d "$3" ]] || die "no such directory: $3"
  nsenter -t "$pid" --mount -- mount --bind "$3" "$3"
  nsenter -t "$pid" --mount -- mount -o remount,bind,ro "$3"
}

writable_dir() {
  local pid; pid=$(holder "$1" "$2")
  nsenter -t "$pid" --mount -- umount "$3"
}

slurm() {  # slurmctld on host 0, a slurmd on every host, authenticated by a munged of their own
  local name="$1" dir="$STATE_ROOT/$1" n i d
  n=$(nhosts "$name")
  [[ "$n" -gt 0 ]] || die "no cluster $name"
  for t in slurmctld slurmd sbatch munged; do command -v "$t" >/dev/null || cannot "$t is not installed (scripts/slurm_local.sh install)"; done
  d="$dir/slurm"
  mkdir -p "$d/ctld" "$d/log" "$d/munge"
  # Its own munged on its own socket (AuthInfo below): never the machine's, which another SLURM
  # (scripts/slurm_local.sh) may start or stop meanwhile. Unix sockets reach every namespace.
  [[ -f /etc/munge/munge.key ]] || mungekey --create >/dev/null 2>&1 || die "cannot create /etc/munge/munge.key"
  local munged_args=(--socket="$d/munge/socket" --pid-file="$d/munge/pid" --log-file="$d/munge/log"
                     --seed-file="$d/munge/seed")
  if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
    chown munge:munge "$d/munge" /etc/munge/munge.key 2>/dev/null || true
    runuser -u munge -- munged "${munged_args[@]}" || die "munged did not start (see $d/munge/log)"
  else
    munged --force "${munged_args[@]}" || die "munged did not start (see $d/munge/log)"
  fi
  for ((i = 0; i < n; i++)); do mkdir -p "$d/spool/$name-h$i"; done
  {
    echo "ClusterName=megaloop-$name"
    echo "SlurmctldHost=$name-h0($SUBNET.1)"
    cat <<EOF
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$d/munge/socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$d/ctld
SlurmdSpoolDir=$d/spool/%n
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
EOF
    for ((i = 0; i < n; i++)); do echo "NodeName=$name-h$i NodeAddr=$SUBNET.$((i + 1)) CPUs=2 State=UNKNOWN"; done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$d/slurm.conf"
  export SLURM_CONF="$d/slurm.conf"
  ( in_host "$name" 0 slurmctld -f "$SLURM_CONF" ) || die "slurmctld did not start (see $d/log)"
  for ((i = 0; i < n; i++)); do ( in_host "$name" "$i" slurmd -f "$SLURM_CONF" ) || die "slurmd on host $i did not start (see $d/log)"; done
  local t
  for ((t = 0; t < 150; t++)); do
    if [[ "$( (in_host "$name" 0 sinfo -h -N -o %T) 2>/dev/null | grep -Ec '^(idle|mixed|allocated)')" == "$n" ]]; then
      echo "SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  tail -n 5 "$d"/log/*.log >&2 || true
  die "SLURM on cluster $name did not come up within 30 s (logs in $d/log)"
}

down() {
  local name="$1" dir="$STATE_ROOT/$1" n i
  n=$(nhosts "$name")
  for ((i = 0; i < n; i++)); do
    kill_host "$name" "$i"
    if [[ -s "$dir/h$i.pid" ]]; then kill -9 "$(cat "$dir/h$i.pid")" 2>/dev/null || true; fi
  done
  for ((i = 0; i < n; i++)); do ip netns del "$(host_ns "$name" "$i")" 2>/dev/null || true; done
  ip netns del "$(switch_ns "$name")" 2>/dev/null || true
  if [[ -s "$dir/slurm/munge/pid" ]]; then kill "$(cat "$dir/slurm/munge/pid")" 2>/dev/null || true; fi
  rm -rf "$dir"
}

status() {
  local name="$1" n i
  n=$(nhosts "$name")
  [[ "$n" -gt 0 ]] || { echo "no cluster $name"; return 1; }
  for ((i = 0; i < n; i++)); do
    echo "$name-h$i $SUBNET.$((i + 1)) link $(ip -n "$(switch_ns "$name")" -o link show "p$i" | grep -o 'state [A-Z]*') processes: $(host_pids "$name" "$i" | wc -l)"
  done
}

[[ $# -ge 2 ]] || usage
cmd="$1"; name="$2"; shift 2
check_name "$name"
case "$cmd" in
  up) [[ $# -eq 1 ]] || usage; up "$name" "$1" ;;
  exec) [[ $# -ge 2 ]] || usage; i="$1"; shift; in_host "$name" "$i" "$@" ;;
  link) [[ $# -eq 2 ]] || usage; link "$name" "$1" "$2" ;;
  kill) [[ $# -eq 1 ]] || usage; kill_host "$name" "$1" ;;
  ro) [[ $# -eq 2 ]] || usage; readonly_dir "$name" "$1" "$2" ;;
  rw) [[ $# -eq 2 ]] || usage; writable_dir "$name" "$1" "$2" ;;
  slurm) slurm "$name" ;;
  down) down "$name" ;;
  status) status "$name" ;;
  *) usage ;;
esac
