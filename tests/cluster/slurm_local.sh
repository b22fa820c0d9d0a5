#!/usr/bin/env bash
# A real two-node Slurm cluster on this host, for tests/cluster.
#
#   tests/cluster/slurm_local.sh up     # install (Debian packages) when missing, configure, start
#   tests/cluster/slurm_local.sh down   # stop the daemons
#   tests/cluster/slurm_local.sh status
#
# munged, slurmctld and two slurmd daemons (`slurmd -N node1`, `slurmd -N node2`, distinct
# ports, one spool directory per node) run as root. Both nodes have this host's CPUs and the
# address 127.0.0.1, so jobs, steps, signals and requeues are Slurm's own, on one machine.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
NODES=(node1 node2)
PORTS=(17001 17002)
CTLD_PORT=${KEEL_SLURMCTLD_PORT:-16817}

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm_local.sh: must run as root (it installs packages and starts daemons)" >&2
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    echo "slurm_local.sh: installing slurmctld slurmd munge slurm-client"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /run/munge
    for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
    {
        echo "# Written by tests/cluster/slurm_local.sh: two nodes on one host."
        echo "ClusterName=keel-local"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "MpiDefault=none"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "ReturnToService=2"
        echo "MinJobAge=900"
        echo "KillWait=5"  # seconds from SIGTERM to SIGKILL at job end; short for tests
        echo "StateSaveLocation=/var/spool/slurmctld"
        echo "SlurmdSpoolDir=/var/spool/slurmd/%n"
        echo "SlurmctldPidFile=/run/slurmctld.pid"
        echo "SlurmdPidFile=/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$LOG_DIR/slurmctld.log"
        echo "SlurmdLogFile=$LOG_DIR/slurmd-%n.log"
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
    # Both daemons on one host share it: no cgroup confinement (proctrack/linuxproc and
    # task/none above); slurmd still loads its autodetected cgroup plugin, which needs no file.
    rm -f "$CONF_DIR/cgroup.conf"
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    mkdir -p /var/lib/munge /var/log/munge
    chown munge:munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
}

wait_idle() {
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -c idle)" -ge "${#NODES[@]}" ]; then
            return 0
        fi
        sleep 1
    done
    echo "slurm_local.sh: nodes did not become idle" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR"/*.log >&2 || true
    return 1
}

up() {
    need_root
    install
    write_conf
    start_munge
    if ! pgrep -x slurmctld >/dev/null; then
        slurmctld -c   # -c: clean start, no jobs or state from an earlier cluster
    fi
    for n in "${NODES[@]}"; do
        if ! pgrep -f "slurmd -N $n" >/dev/null; then
            slurmd -N "$n"
        fi
    done
    wait_idle
    sinfo -N
}

down() {
    need_root
    pkill -f "slurmd -N" 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 20); do
        pgrep -x slurmctld >/dev/null || pgrep -f "slurmd -N" >/dev/null || break
        sleep 0.5
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) sinfo -N && squeue ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
