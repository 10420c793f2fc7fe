#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, from Debian's packages, for tests and demos.
#
#   scripts/slurm.sh install   # apt-get the packages (root)
#   scripts/slurm.sh start     # munged + slurmctld + slurmd, tracked by pid files
#   scripts/slurm.sh stop
#   scripts/slurm.sh status
#
# No systemd and no cgroups here, hence linuxproc/none plugins. kill_invalid_depend and
# EnforcePartLimits=ALL make impossible jobs fail at once instead of pending forever;
# MaxArraySize=4 makes a stage of more than 4 tasks span several array jobs;
# the scheduler settings make a submitted job start in well under a second.
set -euo pipefail

STATE=${SIP_SLURM_DIR:-/var/lib/sip-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# managed by sip scripts/slurm.sh"

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm.sh: $1 needs root" >&2; exit 2; }; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  need_root install
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then return 0; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm.sh: $CONF exists and is not ours; refusing to overwrite it" >&2; exit 2
  fi
  local mem_mb cpus
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cpus=$(nproc)
  mkdir -p /etc/slurm "$STATE/state" "$STATE/spool"
  cat > "$CONF" <<CONF
$MARK
ClusterName=sip-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
# Small on purpose: a stage with more tasks than this is launched as several array jobs, the
# case a large cluster meets at thousands of tasks, and the tests exercise it here.
MaxArraySize=4
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  need_root start
  command -v slurmctld >/dev/null || install
  write_conf
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! alive /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  fi
  alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld -i
  alive "$STATE/slurmd.pid" || /usr/sbin/slurmd -N localhost
  # Wait until the node takes jobs.
  for _ in $(seq 1 60); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "slurm: up ($(sinfo -h -o '%P %D %t'))"; return 0
    fi
    sleep 0.5
  done
  echo "slurm.sh: the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  exit 1
}

stop() {
  for pidf in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    if alive "$pidf"; then kill "$(cat "$pidf")" || true; fi
  done
  echo "slurm: stopped"
}

status() {
  local ok=0
  for pidf in /run/munge/munged.pid "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
    if alive "$pidf"; then echo "running: $pidf"; else echo "stopped: $pidf"; ok=1; fi
  done
  return $ok
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
