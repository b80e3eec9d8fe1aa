#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests and .ci/run.
#
#   scripts/slurm-local.sh start    install Debian's Slurm if missing, write the config, start the daemons
#   scripts/slurm-local.sh stop     stop the daemons this script started (by the pids it recorded)
#   scripts/slurm-local.sh status   say what runs; exit 0 only when the cluster answers
#   scripts/slurm-local.sh env      print `export SLURM_CONF=...` (eval it to use sbatch/squeue by hand)
#
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
# Everything lives under $SEGLAB_SLURM_DIR (default /tmp/seglab-slurm): slurm.conf, gres.conf,
# a private munge key and socket, state, logs, the fake GPU device nodes and the pid files.
# Nothing under /etc is changed and no system service is started, so a machine's own munge or
# Slurm (if any) is left alone. Clients find this cluster through SLURM_CONF only.
#
# Settings that make Slurm work here without systemd or cgroups (see DESIGN.md):
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
#   SelectType=select/cons_tres + CR_Core_Memory + DefMemPerCPU (else one job takes all memory
#   and array tasks run one at a time), fake GPUs (GresTypes=gpu, gres.conf AutoDetect=off,
#   File= device nodes made with mknod c 1 3), DependencyParameters=kill_invalid_depend (a job
#   whose afterok parent failed is cancelled instead of pending forever; since Slurm 21.08 it is
#   not read from SchedulerParameters), jobcomp/filetxt (a record of finished jobs
#   without an accounting database), MinJobAge (scontrol still shows a finished job for a while).
#
# tests/test_slurm.py starts a private one (its own SEGLAB_SLURM_DIR and free ports) and stops it.
# Needs root (package install, mknod, SlurmUser=root).
#
# Environment: SEGLAB_SLURM_DIR, SEGLAB_SLURM_PORT (slurmctld port; slurmd uses PORT+1; default 6817),
# SEGLAB_SLURM_CPUS (CPUs the node offers; default max(4, nproc)), SEGLAB_SLURM_GPUS (default 2).
set -euo pipefail

DIR="${SEGLAB_SLURM_DIR:-/tmp/seglab-slurm}"
PORT="${SEGLAB_SLURM_PORT:-6817}"
GPUS="${SEGLAB_SLURM_GPUS:-2}"
NPROC="$(nproc)"
CPUS="${SEGLAB_SLURM_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}"
HOST="$(hostname -s)"
CONF="$DIR/slurm.conf"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "[slurm-local] $*" >&2; }

installed() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v munged >/dev/null
}

install() {
    installed && return 0
    if [ "$(id -u)" != 0 ]; then
        log "Slurm is not installed and installing needs root: apt-get install ${PACKAGES[*]}"
        return 1
    fi
    if ! command -v apt-get >/dev/null; then
        log "Slurm is not installed and this is not a Debian/Ubuntu system (no apt-get)"
        return 1
    fi
    log "installing ${PACKAGES[*]} (Debian packages; about 20 s)"
    # policy-rc.d keeps the packages' own services from starting: we start the daemons by hand.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || true
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2
}

# pid recorded in $1 if that process is alive and is the daemon named $2 (a reused pid is not ours).
live_pid() {
    local file="$1" name="$2" pid
    [ -s "$file" ] || return 1
    pid="$(tr -dc 0-9 < "$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,dev,munge,run}
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        # A private key: this cluster never talks to another machine.
        head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
    fi
    local i gpu_files
    for ((i = 0; i < GPUS; i++)); do
        # Fake GPUs: character devices with the numbers of /dev/null; Slurm only needs the files.
        [ -c "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 1 3
    done
    gpu_files="$DIR/dev/nvidia[0-$((GPUS - 1))]"
    [ "$GPUS" = 1 ] && gpu_files="$DIR/dev/nvidia0"
    # Memory offered: 3/4 of the machine, in MB.
    local mem_mb
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 3 / 4 / 1024 ))
    cat > "$CONF.tmp" <<EOF
# Written by scripts/slurm-local.sh: a one-node test cluster. Do not edit; edit the script.
ClusterName=seglab-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
GresTypes=gpu
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
SlurmdParameters=config_overrides
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=5
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    cat > "$DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=$HOST Name=gpu File=$gpu_files
EOF
    # Slurm reads plugstack.conf and cgroup.conf beside slurm.conf when present; keep them empty.
    : > "$DIR/plugstack.conf"
}

cluster_answers() {
    SLURM_CONF="$CONF" timeout 10 scontrol ping 2>/dev/null | grep -q 'UP' \
        && SLURM_CONF="$CONF" timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

start() {
    install
    local munge_pid ctld_pid d_pid
    if munge_pid=$(live_pid "$DIR/run/munged.pid" munged) \
        && ctld_pid=$(live_pid "$DIR/run/slurmctld.pid" slurmctld) \
        && d_pid=$(live_pid "$DIR/run/slurmd.pid" slurmd) && cluster_answers; then
        log "already running (munged $munge_pid, slurmctld $ctld_pid, slurmd $d_pid)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    write_config
    if ! live_pid "$DIR/run/munged.pid" munged >/dev/null; then
        # --force: munged refuses to run as root otherwise (here it only serves this cluster).
        munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed" >&2
    fi
    if ! live_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
        SLURM_CONF="$CONF" slurmctld -f "$CONF" >&2
    fi
    if ! live_pid "$DIR/run/slurmd.pid" slurmd >/dev/null; then
        SLURM_CONF="$CONF" slurmd -f "$CONF" >&2
    fi
    local i
    for ((i = 0; i < 150; i++)); do
        if cluster_answers; then
            # A node left DOWN/DRAINED by an earlier unclean stop: return it to service.
            SLURM_CONF="$CONF" scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
            log "cluster up: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D %T %c cpus %G' | tr '\n' ';')"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        # A node left DOWN by an earlier unclean stop does not come back by itself.
        if ((i % 10 == 9)); then
            SLURM_CONF="$CONF" scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    log "the cluster did not come up within 30 s; logs in $DIR/log/"
    tail -n 5 "$DIR"/log/*.log >&2 || true
    return 1
}

stop() {
    # SIGTERM to each daemon this script started (pid files under $DIR, checked against the
    # process name), all at once; SIGKILL to any still there after 10 s.
    local name pid i pids=() names=()
    for name in slurmd slurmctld munged; do
        if pid=$(live_pid "$DIR/run/$name.pid" "$name"); then
            kill -TERM "$pid" && pids+=("$pid") && names+=("$name($pid)")
        fi
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 100; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$DIR"/run/{slurmd,slurmctld,munged}.pid
    [ "${#names[@]}" -gt 0 ] && log "stopped ${names[*]}"
    return 0
}

status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        if pid=$(live_pid "$DIR/run/$name.pid" "$name"); then
            echo "$name running (pid $pid)"
        else
            echo "$name not running"
            rc=1
        fi
    done
    if [ "$rc" = 0 ] && cluster_answers; then
        SLURM_CONF="$CONF" sinfo
        echo "export SLURM_CONF=$CONF"
    else
        rc=1
    fi
    return "$rc"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    install) install ;;
    *) echo "usage: $0 start|stop|restart|status|env|install" >&2; exit 2 ;;
esac
