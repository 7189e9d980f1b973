#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for tests and for trying the sbatch scripts.
#
#   tests/cluster/slurm/cluster.sh start    # install (if missing) + start munged, slurmctld, slurmd n1/n2
#   tests/cluster/slurm/cluster.sh status   # sinfo; exit 0 only when both nodes are usable
#   tests/cluster/slurm/cluster.sh stop     # stop the daemons this script started
#
# Needs root and Debian's packages slurmctld slurmd slurm-client munge (installed with apt-get when
# missing; Slurm 22.05 on bookworm). No systemd: the daemons are started directly. Both "nodes"
# (n1, n2) are slurmd processes on this host (NodeAddr=127.0.0.1, ports 17001/17002, 1 CPU each),
# so any local path is "shared storage" between them. Idempotent: a second `start` only checks.
#
# State, logs and pid files live in $BIGTRAIN_SLURM_STATE (default /var/tmp/bigtrain-slurm). The
# config is written to /etc/slurm/slurm.conf, which the client commands read; an existing
# slurm.conf that this script did not write is never overwritten.
set -euo pipefail

STATE=${BIGTRAIN_SLURM_STATE:-/var/tmp/bigtrain-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by bigtrain tests/slurm/cluster.sh"
NODES=(n1 n2)
WAIT_S=${CLUSTER_WAIT_S:-60}

log() { echo "cluster.sh: $*" >&2; }

alive() {  # alive PIDFILE -> 0 when the pid in it is a running process
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || { log "need root to apt-get install ${missing[*]}"; return 1; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq >/dev/null
  timeout 300 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_conf() {
  if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    log "$CONF exists and was not written by this script; refusing to overwrite it"; return 1
  fi
  local host; host=$(hostname -s 2>/dev/null || uname -n)
  mkdir -p /etc/slurm "$STATE/ctld"
  local new; new=$(cat <<CONF
$MARKER
ClusterName=bigtrain-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
# keep finished jobs visible to scontrol for a while (there is no accounting database, so no sacct)
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# seconds between SIGTERM and SIGKILL when a job step is killed (time to write a checkpoint)
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
  if [[ ! -e $CONF ]] || [[ $(cat "$CONF") != "$new" ]]; then
    printf '%s\n' "$new" >"$CONF"
    log "wrote $CONF"
  fi
}

start_munge() {
  if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  chmod 0700 /etc/munge
  chmod 0755 /run/munge
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "munged did not come up"; return 1
}

start_slurm() {
  mkdir -p "$STATE/ctld"
  if ! alive "$STATE/slurmctld.pid"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF"   # daemonizes; -c would clear saved jobs, we keep them
  fi
  for n in "${NODES[@]}"; do
    mkdir -p "$STATE/slurmd-$n"
    if ! alive "$STATE/slurmd-$n.pid"; then
      log "starting slurmd -N $n"
      /usr/sbin/slurmd -f "$CONF" -N "$n"
    fi
  done
}

nodes_ready() {  # both nodes up (idle, or allocated/mixed by a job)
  local states; states=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  local n
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|alloc|mix|comp)\$" <<<"$states" || return 1
  done
}

wait_ready() {
  local deadline=$((SECONDS + WAIT_S)) resumed=0
  until nodes_ready; do
    if ((SECONDS > deadline)); then
      log "nodes not ready after ${WAIT_S}s:"; timeout 10 sinfo -N -l >&2 || true
      log "see logs in $STATE"; return 1
    fi
    # nodes left DOWN/DRAINED by an earlier unclean stop: put them back in service once
    if ((resumed == 0)) && timeout 10 sinfo -h -N -o '%t' 2>/dev/null | grep -Eq 'down|drain'; then
      timeout 10 scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
      resumed=1
    fi
    sleep 0.5
  done
}

case "${1:-}" in
  start)
    if nodes_ready && alive "$STATE/slurmctld.pid"; then log "already running"; exit 0; fi
    install_packages
    write_conf
    start_munge
    start_slurm
    wait_ready
    log "cluster up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
    ;;
  stop)
    for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
      if alive "$f"; then
        pid=$(cat "$f"); kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
    done
    log "stopped slurm daemons (munged left running)"
    ;;
  status)
    timeout 10 sinfo -N -l || true
    nodes_ready
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
