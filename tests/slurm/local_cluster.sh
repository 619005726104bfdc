#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the integration tests and for trying `dora grid`
# without a cluster.
#
#   tests/slurm/local_cluster.sh start    install slurm-wlm and munge if missing (apt, needs root),
#                                         configure, start munged, slurmctld and slurmd, wait idle
#   tests/slurm/local_cluster.sh stop     stop the daemons (by PID)
#   tests/slurm/local_cluster.sh status   sinfo / squeue
#   eval "$(tests/slurm/local_cluster.sh env)"   point Slurm clients (and dora grid) at it
#
# Everything lives in $DEMIXLAB_SLURM_DIR (default /tmp/demixlab-slurm): slurm.conf, gres.conf,
# state, logs. The node advertises two fake GPUs (plain files) so that `gpus=2` XPs run as two
# tasks (gloo on CPU). There is no accounting database: a `sacct` stand-in (tests/slurm/bin) answers
# from `scontrol show job` and the job completion log, which is all submitit and Dora need.
set -euo pipefail

DIR=${DEMIXLAB_SLURM_DIR:-/tmp/demixlab-slurm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SLURM_CONF="$DIR/slurm.conf"

say() { echo "local_cluster: $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    say "slurm-wlm and munge are not installed and installing them needs root"
    exit 3
  fi
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  # Leave 1 GiB to the system; Slurm refuses a node whose RealMemory exceeds what it finds.
  memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/gpus"
  touch "$DIR/gpus/gpu0" "$DIR/gpus/gpu1" "$DIR/log/jobcomp.log"
  cat > "$DIR/slurm.conf" <<EOF
# Written by tests/slurm/local_cluster.sh
ClusterName=demixlab
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes; afterwards the completion log answers.
MinJobAge=600
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued. submitit ignores SIGTERM
# (it checkpoints on USR2), so the default 30 s would let a small job finish before it is killed.
KillWait=3
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:2 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # No cgroup.conf on purpose: CgroupPlugin=disabled kills slurmd 22.05, none at all works.
  cat > "$DIR/gres.conf" <<EOF
Name=gpu File=$DIR/gpus/gpu0
Name=gpu File=$DIR/gpus/gpu1
EOF
}

running() {  # running PIDFILE
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
  install_packages
  if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
    say "already running ($DIR)"
    return
  fi
  write_config
  mkdir -p /run/munge
  chown munge:munge /run/munge 2>/dev/null || true
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  slurmctld -c
  slurmd
  for _ in $(seq 150); do
    if [ "$(sinfo -h -o %T 2>/dev/null)" = "idle" ]; then
      say "node $(hostname -s) idle; export SLURM_CONF=$SLURM_CONF PATH=$HERE/bin:\$PATH"
      return
    fi
    sleep 0.2
  done
  say "the node did not become idle; see $DIR/log"
  sinfo -N -l >&2 || true
  exit 1
}

stop() {
  local pidfile pid
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    if running "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  env) echo "export SLURM_CONF=$SLURM_CONF PATH=$HERE/bin:\$PATH" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
