#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the integration tests and for trying `dora grid`
# without a cluster.
#
#   tests/slurm/local_cluster.sh start    install slurm-wlm and munge if missing (apt, needs root),
#                                         configure, start munged, slurmctld and slurmd, wait idle
#   tests/slurm/local_cluster.sh stop     cancel every job and wait until Slurm has ended them, stop
#                                         slurmd and slurmctld, kill any job step still alive, stop
#                                         munged; does nothing for what is already stopped
#   tests/slurm/local_cluster.sh status   sinfo / squeue
#   eval "$(tests/slurm/local_cluster.sh env)"   point Slurm clients (and dora grid) at it
#
# Everything lives in $DEMIXLAB_SLURM_DIR (default /tmp/demixlab-slurm): slurm.conf, gres.conf,
# state, logs, and a munged of its own (own key and socket, which slurm.conf names), so that several
# clusters (two test sessions, say) run side by side on free ports and stopping one leaves the
# others, and any system munged, alone. The node advertises two fake GPUs (plain files) so that `gpus=2` XPs run as two
# tasks (gloo on CPU). There is no accounting database: a `sacct` stand-in (tests/slurm/bin) answers
# from `scontrol show job` and the job completion log, which is all submitit and Dora need.
set -euo pipefail

DIR=$(realpath -m "${DEMIXLAB_SLURM_DIR:-/tmp/demixlab-slurm}")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SLURM_CONF="$DIR/slurm.conf"
MUNGE="$DIR/munge"

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

free_ports() {  # two TCP ports nothing listens on now
  python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for sock in sockets:
    sock.bind(("127.0.0.1", 0))
print(*(sock.getsockname()[1] for sock in sockets))'
}

write_config() {
  local host cpus memory ctld_port slurmd_port
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys both (the tests set the first)
  read -r ctld_port slurmd_port < <(free_ports)
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
AuthInfo=socket=$MUNGE/munge.socket
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
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

start_munge() {  # a munged of this cluster's own, with its own key
  mkdir -p "$MUNGE"
  chmod 711 "$MUNGE"
  if [ ! -s "$MUNGE/munge.key" ]; then
    (umask 077 && head -c 128 /dev/urandom > "$MUNGE/munge.key")
  fi
  if running "$MUNGE/munged.pid"; then
    return
  fi
  "$(PATH=$PATH:/usr/sbin:/sbin command -v munged)" --force --socket="$MUNGE/munge.socket" \
    --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
    --seed-file="$MUNGE/munged.seed"
}

start() {
  install_packages
  if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
    say "already running ($DIR)"
    return
  fi
  stop 2>/dev/null  # whatever is left of an earlier start
  write_config
  start_munge
  slurmctld -c
  slurmd
  # Generous: a loaded machine starts the daemons slowly.
  local deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
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

stop_daemon() {  # stop_daemon PIDFILE: SIGTERM, then SIGKILL if it is still there after 30 s
  local pid deadline=$((SECONDS + 30))
  if running "$1"; then
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || true
    while [ $SECONDS -lt $deadline ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

job_processes() {  # PIDs of this cluster's job steps (slurmstepd) and of the programs they run
  local environ pid
  # Both carry this cluster's SLURM_CONF in their environment (slurmd passes its own on; jobs get
  # the submitter's); a shell that merely points at the cluster has no SLURM_JOB_ID.
  for environ in $(grep -lzx "SLURM_CONF=$SLURM_CONF" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || grep -qz '^SLURM_JOB_ID=' "$environ" 2>/dev/null; then
      echo "$pid"
    fi
  done
}

stop() {
  local jobs pids deadline
  if running "$DIR/slurmctld.pid"; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs" $jobs
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      # Until Slurm lists none (completing jobs included): their steps have ended.
      deadline=$((SECONDS + 120))
      while [ $SECONDS -lt $deadline ] && [ -n "$(squeue -h -o %A 2>/dev/null)" ]; do
        sleep 0.2
      done
    fi
  fi
  stop_daemon "$DIR/slurmd.pid"
  stop_daemon "$DIR/slurmctld.pid"
  pids=$(job_processes)
  if [ -n "$pids" ]; then
    say "killing job processes left behind:" $pids
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
  stop_daemon "$MUNGE/munged.pid"
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  env) echo "export SLURM_CONF=$SLURM_CONF PATH=$HERE/bin:\$PATH" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
