#!/usr/bin/env bash
# A real single-node Slurm cluster for the tests, from Debian's slurm-wlm and munge, run as root.
#
#   tests/slurm/cluster.sh start DIR   write DIR/slurm.conf for this host, start munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop DIR    stop them (and cancel what still runs)
#
# Clients find the cluster with SLURM_CONF=DIR/slurm.conf; nothing under /etc/slurm is touched. The
# ports are free ones picked at start, so a second cluster (or a system one) does not collide.
set -euo pipefail
cmd=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

if [[ $cmd == stop ]]; then stop; exit 0; fi
[[ $cmd == start ]] || { echo "usage: cluster.sh start|stop DIR" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "cluster.sh: needs root (slurmd runs jobs as their user)" >&2; exit 2; }
for bin in munged slurmctld slurmd sbatch; do
  command -v "$bin" >/dev/null || { echo "cluster.sh: $bin not found; apt-get install slurm-wlm munge" >&2; exit 2; }
done

mkdir -p "$dir"/{state,spool,munge,log}
chmod 700 "$dir/munge"
host=$(hostname -s)
cpus=$(nproc)
slots=${KOMPAKT_SLURM_CPUS:-$(( cpus > 8 ? cpus : 8 ))}
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# munge: a key of our own, a socket of our own.
[[ -s $dir/munge/munge.key ]] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"

cat > "$dir/slurm.conf" <<CONF
ClusterName=kompakt-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(port)
SlurmdPort=$(port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# A requeued job waits cred_expire seconds before it is eligible again (120 by default).
# A requeued job's training needs time to save after SIGTERM before SIGKILL.
KillWait=60
MinJobAge=3600
SlurmdTimeout=60
MessageTimeout=30
# More CPUs than the machine has, so the tests' jobs (mostly waiting) run side by side.
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$slots RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF=$dir/slurm.conf
slurmctld -c -f "$SLURM_CONF"   # -c: a clean state, no jobs from an earlier run
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  [[ $state == idle* ]] && { echo "slurm: $host idle, $slots CPU slots on $cpus cores ($SLURM_CONF)"; exit 0; }
  sleep 0.2
done
echo "cluster.sh: $host did not become idle (state: ${state:-none}); see $dir/log" >&2
stop
exit 1
