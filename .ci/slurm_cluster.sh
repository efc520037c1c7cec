#!/bin/bash
# A single-machine SLURM cluster from Debian packages (bookworm: Slurm 22.05), for testing the
# project's cluster paths against a real scheduler (sbatch, srun, submitit, requeue): tests/cluster/.
# .ci/run starts it before the tests; run it yourself (as root, on a Debian/Ubuntu machine) to run
# tests/cluster/ locally. Idempotent: installs what is missing, (re)writes
# /etc/slurm/slurm.conf, starts munged, slurmctld and slurmd if they are not running (no
# systemd: the daemons are started directly, as root, logs under /var/log/slurm), waits until
# the node is idle and prints sinfo.
#
#   bash .ci/slurm_cluster.sh            # one node (this host), CPUs=2
#   NODES=2 bash .ci/slurm_cluster.sh    # two slurmd on this machine (only if this Slurm build has
#                                        # --enable-multiple-slurmd; otherwise it says so and uses one)
#
# SchedulerParameters=batch_sched_delay=0: a job submitted, or released from a requeue, starts at
# the next scheduling pass instead of up to 3 s later (Slurm's default delay for batch jobs, meant
# for clusters that take hundreds of submissions a second); the cluster tests submit and requeue
# about ten times a run and waited 1.6 s on average for each.
#
# Stop the daemons (pids are written by the daemons themselves):
#   kill $(cat /run/slurmd*.pid) $(cat /run/slurmctld.pid) $(cat /run/munge/munged.pid)
set -euo pipefail

HOST=$(hostname -s)
CPUS=${CPUS:-2}
MEM=${MEM:-20000}
NODES=${NODES:-1}
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm

log() { echo "[setup] $*"; }

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
log "$(slurmd -V)"

# ---------------------------------------------------------------- munge
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 0755 /run/munge
chmod 0700 /var/lib/munge /var/log/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

alive() {  # alive PIDFILE: the pid in it is a running process
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if ! alive /run/munge/munged.pid; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 20); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n </dev/null | unmunge >/dev/null || { echo "munge does not work" >&2; exit 1; }

# ---------------------------------------------------------------- slurm.conf
mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld
MULTI=0
if [ "$NODES" -gt 1 ]; then
    # Several slurmd on one host need a build with --enable-multiple-slurmd; only a running
    # controller says so (scontrol show config: MULTIPLE_SLURMD). Bring up the one-node cluster
    # first, ask, then rewrite the config for NODES nodes.
    if ! alive /run/slurmctld.pid; then NODES=1 bash "$0"; fi
    ctl_config=$(scontrol show config 2>/dev/null || true)   # not piped into grep -q: pipefail + SIGPIPE
    if grep -qE '^MULTIPLE_SLURMD *= *Yes' <<<"$ctl_config"; then
        MULTI=1
    else
        log "this Slurm build has no multiple-slurmd support: one node only"
        NODES=1
    fi
fi

if [ "$MULTI" = 1 ]; then
    # Lightning takes MASTER_ADDR from the first node's name: the node names must resolve.
    for i in $(seq 1 "$NODES"); do
        getent hosts "${HOST}${i}" >/dev/null || echo "127.0.0.1 ${HOST}${i}" >> /etc/hosts
    done
fi

node_lines() {
    if [ "$MULTI" = 1 ]; then
        for i in $(seq 1 "$NODES"); do
            echo "NodeName=${HOST}${i} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN"
        done
    else
        echo "NodeName=${HOST} CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN"
    fi
}

NEW_CONF=$(cat <<EOF
# Written by setup.sh: a single-machine test cluster, daemons run as root in a container.
ClusterName=local
SlurmctldHost=${HOST}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd%n.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
RESTART=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    log "writing $CONF"
    printf '%s\n' "$NEW_CONF" > "$CONF"
    RESTART=1
fi
# No cgroups are used (proctrack/linuxproc, task/none); 22.05 has no CgroupPlugin=disabled, and
# an earlier version of this script wrote one: drop it (slurmd then autodetects and carries on).
if [ -f /etc/slurm/cgroup.conf ] && grep -q '^CgroupPlugin=disabled' /etc/slurm/cgroup.conf; then
    rm -f /etc/slurm/cgroup.conf
fi

node_names() {
    if [ "$MULTI" = 1 ]; then for i in $(seq 1 "$NODES"); do echo "${HOST}${i}"; done; else echo "$HOST"; fi
}

# ---------------------------------------------------------------- daemons
if [ "$RESTART" = 1 ]; then  # a changed config: restart what we run (by pid file)
    for f in /run/slurmd*.pid; do
        alive "$f" && kill "$(cat "$f")" || true
    done
    alive /run/slurmctld.pid && kill "$(cat /run/slurmctld.pid)" || true
    sleep 2
fi
if ! alive /run/slurmctld.pid; then
    log "starting slurmctld (log ${LOGDIR}/slurmctld.log)"
    /usr/sbin/slurmctld
fi
for n in $(node_names); do
    mkdir -p "/var/spool/slurmd${n}"
    if ! alive "/run/slurmd${n}.pid"; then
        log "starting slurmd for node ${n} (log ${LOGDIR}/slurmd${n}.log)"
        if [ "$MULTI" = 1 ]; then /usr/sbin/slurmd -N "$n"; else /usr/sbin/slurmd; fi
    fi
done

# ---------------------------------------------------------------- wait for the node(s)
log "waiting for the node(s) to be idle"
for _ in $(seq 60); do
    states=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    case "$states" in
        "idle "|"mix "|"alloc "|"idle mix "|"alloc idle "|"alloc mix ") break ;;
    esac
    # a node left down/drained by an earlier run comes back
    for n in $(node_names); do
        scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
    done
    sleep 1
done
sinfo
if sinfo -h -N -o '%t' | grep -qvE 'idle|mix|alloc'; then echo "node not idle: see ${LOGDIR}" >&2; exit 1; fi
log "daemons: munged $(cat /run/munge/munged.pid) slurmctld $(cat /run/slurmctld.pid)$(for n in $(node_names); do printf ' slurmd(%s) %s' "$n" "$(cat "/run/slurmd${n}.pid")"; done)"
