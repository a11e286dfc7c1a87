#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for trying and testing `hydra/launcher=slurm`:
#   scripts/slurm_local.sh start    munge + slurmctld + slurmd, node "localhost" with this machine's CPUs and memory
#   scripts/slurm_local.sh stop     stops what start started (by the pids it recorded)
#   scripts/slurm_local.sh status   sinfo
# Needs root and Debian's slurm-wlm 22.05 and munge (apt-get install slurm-wlm munge). No accounting database:
# sacct fails, so ssat's launcher (hydra_plugins/ssat_launcher/) waits on squeue. Settings that work in a
# container: proctrack/linuxproc, task/none, cgroup/v1 (no cgroup plugin is loaded with these), select/cons_tres.
# Exit status 3: this machine cannot run it (not root, packages missing); the message says why.
set -euo pipefail

STATE=${SSAT_SLURM_STATE:-/var/lib/ssat-slurm}
CONF_DIR=/etc/slurm
MARK="# written by ssat scripts/slurm_local.sh"

cannot() { echo "slurm_local: cannot start: $*" >&2; exit 3; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
    echo "slurm_local: $what did not come up; logs in $STATE/log" >&2
    exit 1
}

# The machine's CPUs: GNU nproc lowers its answer to $OMP_NUM_THREADS, which `make test` sets to 1.
cpu_count() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

write_conf() {
    local cpus mem_mb
    cpus=$(cpu_count)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    for f in slurm.conf cgroup.conf; do
        if [[ -e $CONF_DIR/$f ]] && ! grep -qF "$MARK" "$CONF_DIR/$f"; then
            cannot "$CONF_DIR/$f exists and was not written by this script (a real cluster's config?)"
        fi
    done
    mkdir -p "$CONF_DIR"
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=ssat-local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/cgroup.conf" <<EOF
$MARK
CgroupPlugin=cgroup/v1
EOF
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then  # a key of our own: this cluster is one machine
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
        wait_for 10 munged bash -c 'munge -n </dev/null | unmunge'
        cp /run/munge/munged.pid "$STATE/run/munged.pid"
    fi
}

start() {
    [[ $(id -u) == 0 ]] || cannot "needs root (it writes $CONF_DIR and runs the daemons)"
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || cannot "$tool not found: apt-get install slurm-wlm munge"
    done
    if scontrol ping 2>/dev/null | grep -q "is UP"; then
        echo "slurm_local: already running"
        return 0
    fi
    mkdir -p "$STATE"/{ctld,d,run,log}
    write_conf
    start_munge
    slurmctld
    wait_for 20 slurmctld bash -c 'scontrol ping | grep -q "is UP"'
    slurmd -N localhost
    wait_for 30 "the node" bash -c 'sinfo -h -n localhost -o %T | grep -qE "^(idle|mixed|allocated)"'
    echo "slurm_local: cluster up (partition local, node localhost: $(cpu_count) CPUs); stop with $0 stop"
}

stop_pid() {  # stop_pid NAME: stops the daemon whose pid file this script's state holds
    local file=$STATE/run/$1.pid pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    rm -f "$file"
}

stop() {
    scancel --user="$(id -un)" 2>/dev/null || true
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    echo "slurm_local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
