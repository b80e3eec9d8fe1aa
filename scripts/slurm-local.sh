#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests and .ci/run.
#
#   scripts/slurm-local.sh start    install Debian's Slurm if missing, write the config, start the daemons
#   scripts/slurm-local.sh start --accounting
#                                   the same with accounting: MariaDB + slurmdbd, so `sacct` works
#   scripts/slurm-local.sh stop     stop the daemons this script started (by the pids it recorded)
#   scripts/slurm-local.sh status   say what runs; exit 0 only when the cluster answers
#   scripts/slurm-local.sh env      print `export SLURM_CONF=...` (eval it to use sbatch/squeue by hand)
#
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
# `start` with another configuration than the running one (accounting on/off, MinJobAge, ...)
# restarts the daemons with the new one (the job state under $DIR/state is kept).
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
# Accounting (--accounting or SEGLAB_SLURM_ACCOUNTING=1): also installs Debian's slurmdbd and
# mariadb-server if missing (their own services are kept from starting), initialises a MariaDB
# data folder under $DIR/mysql, starts mariadbd by hand on 127.0.0.1:DB_PORT and a private socket
# (running as root, --no-defaults: /etc/mysql is not read), creates slurm_acct_db and its user
# (a random password in $DIR/mysql/slurm.pass), writes $DIR/slurmdbd.conf (mode 600, SlurmUser root),
# starts slurmdbd, registers the cluster (sacctmgr -i add cluster) and then starts slurmctld and
# slurmd with AccountingStorageType=accounting_storage/slurmdbd. Without it there is no database
# and `sacct` fails ("Slurm accounting storage is disabled").
#
# tests/test_slurm.py starts a private one (its own SEGLAB_SLURM_DIR and free ports) and stops it.
# Needs root (package install, mknod, SlurmUser=root).
#
# Environment: SEGLAB_SLURM_DIR, SEGLAB_SLURM_PORT (slurmctld port; slurmd uses PORT+1; default 6817),
# SEGLAB_SLURM_CPUS (CPUs the node offers; default max(4, nproc)), SEGLAB_SLURM_GPUS (default 2),
# SEGLAB_SLURM_MIN_JOB_AGE (seconds slurmctld keeps a finished job; default 600),
# SEGLAB_SLURM_ACCOUNTING=1 (as --accounting), SEGLAB_SLURM_DBD_PORT (slurmdbd; default PORT+2),
# SEGLAB_SLURM_DB_PORT (mariadbd, on 127.0.0.1 only; default PORT+3).
set -euo pipefail

DIR="${SEGLAB_SLURM_DIR:-/tmp/seglab-slurm}"
PORT="${SEGLAB_SLURM_PORT:-6817}"
GPUS="${SEGLAB_SLURM_GPUS:-2}"
NPROC="$(nproc)"
CPUS="${SEGLAB_SLURM_CPUS:-$(( NPROC > 4 ? NPROC : 4 ))}"
HOST="$(hostname -s)"
CONF="$DIR/slurm.conf"
MIN_JOB_AGE="${SEGLAB_SLURM_MIN_JOB_AGE:-600}"
ACCOUNTING="${SEGLAB_SLURM_ACCOUNTING:-0}"
DBD_PORT="${SEGLAB_SLURM_DBD_PORT:-$((PORT + 2))}"
DB_PORT="${SEGLAB_SLURM_DB_PORT:-$((PORT + 3))}"
DB_DIR="$DIR/mysql"
DB_SOCKET="$DB_DIR/mysqld.sock"
PACKAGES=(slurmctld slurmd slurm-client munge)
ACCT_PACKAGES=(slurmdbd mariadb-server)

log() { echo "[slurm-local] $*" >&2; }

installed() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v munged >/dev/null || return 1
    if [ "$ACCOUNTING" = 1 ]; then
        command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
            && command -v mariadb-install-db >/dev/null && command -v mariadb >/dev/null || return 1
    fi
}

install() {
    installed && return 0
    local packages=("${PACKAGES[@]}")
    [ "$ACCOUNTING" = 1 ] && packages+=("${ACCT_PACKAGES[@]}")
    if [ "$(id -u)" != 0 ]; then
        log "Slurm is not installed and installing needs root: apt-get install ${packages[*]}"
        return 1
    fi
    if ! command -v apt-get >/dev/null; then
        log "Slurm is not installed and this is not a Debian/Ubuntu system (no apt-get)"
        return 1
    fi
    log "installing ${packages[*]} (Debian packages; about 20 s, 35 s with accounting)"
    # A policy-rc.d that answers 101 keeps the packages' own services (munge, slurm*, a system
    # MariaDB on port 3306) from starting: we start the daemons by hand. Docker images have one;
    # elsewhere one is put there for the install only.
    local own_policy=0 rc=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || true
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2 || rc=$?
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return "$rc"
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
    # Writes $CONF.new (start() compares it with the running one), gres.conf and the fake GPUs.
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
    local mem_mb accounting
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 3 / 4 / 1024 ))
    accounting="AccountingStorageType=accounting_storage/none"
    if [ "$ACCOUNTING" = 1 ]; then
        # AccountingStoragePass: the munge socket for talking to slurmdbd (AuthInfo is not used
        # for that connection; without it sacct and slurmctld look for /run/munge/munge.socket.2).
        accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.socket"
    fi
    cat > "$CONF.new" <<EOF
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
$accounting
JobAcctGatherType=jobacct_gather/none
MinJobAge=$MIN_JOB_AGE
KillWait=5
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
    cat > "$DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=$HOST Name=gpu File=$gpu_files
EOF
    # Slurm reads plugstack.conf and cgroup.conf beside slurm.conf when present; keep them empty.
    : > "$DIR/plugstack.conf"
}

conf_has_accounting() {
    [ -s "$CONF" ] && grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF"
}

cluster_answers() {
    SLURM_CONF="$CONF" timeout 10 scontrol ping 2>/dev/null | grep -q 'UP' \
        && SLURM_CONF="$CONF" timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

# The daemons the requested mode runs, in start order.
daemons() {
    if [ "$ACCOUNTING" = 1 ]; then
        echo munged mariadbd slurmdbd slurmctld slurmd
    else
        echo munged slurmctld slurmd
    fi
}

db_sql() {
    mariadb --no-defaults --socket="$DB_SOCKET" -u root -N -B "$@"
}

# MariaDB under $DB_DIR, by hand: initialised once, then started on 127.0.0.1:$DB_PORT.
start_db() {
    local i pass
    mkdir -p "$DB_DIR"
    chmod 700 "$DB_DIR"
    # Small InnoDB files (the default redo log alone is 96 MB); a test cluster records few jobs.
    local innodb=(--innodb-log-file-size=8M --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900)
    if [ ! -d "$DB_DIR/data/mysql" ]; then
        rm -rf "$DB_DIR/data"
        log "initialising a MariaDB data folder in $DB_DIR/data"
        # --auth-root-authentication-method=socket: root logs in through the socket as the Unix root.
        mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=root --skip-test-db \
            --auth-root-authentication-method=socket "${innodb[@]}" > "$DIR/log/mariadb-install.log" 2>&1 || {
            log "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
            tail -n 5 "$DIR/log/mariadb-install.log" >&2
            return 1
        }
    fi
    if ! live_pid "$DIR/run/mariadbd.pid" mariadbd >/dev/null; then
        # --no-defaults: nothing from /etc/mysql; --user=root: mariadbd refuses root otherwise
        # (the data folder may sit under a 700 temporary folder the mysql user cannot enter).
        setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR/data" --socket="$DB_SOCKET" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" "${innodb[@]}" \
            < /dev/null > /dev/null 2>&1 &
    fi
    for ((i = 0; i < 150; i++)); do
        mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping > /dev/null 2>&1 && break
        sleep 0.2
    done
    if ! mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping > /dev/null 2>&1; then
        log "mariadbd did not answer within 30 s; see $DIR/log/mariadbd.log"
        tail -n 5 "$DIR/log/mariadbd.log" >&2 || true
        return 1
    fi
    if [ ! -s "$DB_DIR/slurm.pass" ]; then
        (umask 077; head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$DB_DIR/slurm.pass")
    fi
    pass="$(cat "$DB_DIR/slurm.pass")"
    db_sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_dbd() {
    local i
    # slurmdbd reads slurmdbd.conf beside $SLURM_CONF and refuses it unless it is mode 600 and
    # owned by SlurmUser (root here).
    (umask 077; cat > "$DIR/slurmdbd.conf.tmp" <<EOF
# Written by scripts/slurm-local.sh. Do not edit; edit the script.
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DB_DIR/slurm.pass")
StorageLoc=slurm_acct_db
EOF
)
    chmod 600 "$DIR/slurmdbd.conf.tmp"
    mv "$DIR/slurmdbd.conf.tmp" "$DIR/slurmdbd.conf"
    if ! live_pid "$DIR/run/slurmdbd.pid" slurmdbd >/dev/null; then
        SLURM_CONF="$CONF" slurmdbd >&2
    fi
    # The first start creates the tables (a few seconds); sacctmgr answers once it is done.
    local ok=0 deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        if SLURM_CONF="$CONF" timeout 5 sacctmgr -n -P show cluster format=cluster > "$DIR/run/clusters" 2> "$DIR/log/sacctmgr.err"; then
            ok=1
            break
        fi
        sleep 0.2
    done
    if [ "$ok" != 1 ]; then
        log "slurmdbd did not answer within 60 s; see $DIR/log/slurmdbd.log"
        tail -n 3 "$DIR/log/sacctmgr.err" "$DIR/log/slurmdbd.log" >&2 || true
        return 1
    fi
    if ! grep -qx 'seglab-local' "$DIR/run/clusters"; then
        SLURM_CONF="$CONF" sacctmgr -i add cluster seglab-local >&2
    fi
}

start() {
    install
    local name pid running=() all=1
    for name in $(daemons); do
        if pid=$(live_pid "$DIR/run/$name.pid" "$name"); then
            running+=("$name $pid")
        else
            all=0
        fi
    done
    write_config
    if [ "$all" = 1 ] && cmp -s "$CONF.new" "$CONF" && cluster_answers; then
        rm -f "$CONF.new"
        log "already running ($(IFS=,; echo "${running[*]}" | sed 's/,/, /g'))$([ "$ACCOUNTING" = 1 ] && echo ', with accounting')"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    if [ -s "$CONF" ] && ! cmp -s "$CONF.new" "$CONF"; then
        if [ "${#running[@]}" -gt 0 ] || live_pid "$DIR/run/slurmdbd.pid" slurmdbd >/dev/null \
            || live_pid "$DIR/run/mariadbd.pid" mariadbd >/dev/null; then
            log "the running cluster has another configuration ($(diff "$CONF" "$CONF.new" | grep '^>' \
                | cut -c3- | tr '\n' ' ')): restarting it"
            stop
        fi
    fi
    mv "$CONF.new" "$CONF"
    if ! live_pid "$DIR/run/munged.pid" munged >/dev/null; then
        # --force: munged refuses to run as root otherwise (here it only serves this cluster).
        munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
            --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed" >&2
    fi
    if [ "$ACCOUNTING" = 1 ]; then
        start_db
        start_dbd
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
            log "cluster up: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D %T %c cpus %G' | tr '\n' ';')$(
                [ "$ACCOUNTING" = 1 ] && echo " accounting: slurmdbd on 127.0.0.1:$DBD_PORT, MariaDB on 127.0.0.1:$DB_PORT")"
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

# SIGTERM to the named daemons this script started (pid files under $DIR, checked against the
# process name), all at once; SIGKILL to any still there after $1 seconds.
stop_group() {
    local wait_s="$1" name pid i pids=()
    shift
    for name in "$@"; do
        if pid=$(live_pid "$DIR/run/$name.pid" "$name"); then
            kill -TERM "$pid" && pids+=("$pid") && STOPPED+=("$name($pid)")
        fi
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < wait_s * 10; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done
    for name in "$@"; do
        rm -f "$DIR/run/$name.pid"
    done
}

stop() {
    # With accounting, in order: the Slurm daemons (slurmctld sends its last job records to
    # slurmdbd), then slurmdbd (it writes them to MariaDB), then MariaDB (a clean InnoDB
    # shutdown) and munged.
    STOPPED=()
    if live_pid "$DIR/run/slurmdbd.pid" slurmdbd >/dev/null || live_pid "$DIR/run/mariadbd.pid" mariadbd >/dev/null; then
        stop_group 10 slurmd slurmctld
        stop_group 10 slurmdbd
        stop_group 30 mariadbd munged
    else
        stop_group 10 slurmd slurmctld munged    # no accounting: all at once, as fast as before
    fi
    [ "${#STOPPED[@]}" -gt 0 ] && log "stopped ${STOPPED[*]}"
    return 0
}

status() {
    local name pid rc=0 names="munged slurmctld slurmd"
    conf_has_accounting && names="munged mariadbd slurmdbd slurmctld slurmd"
    for name in $names; do
        if pid=$(live_pid "$DIR/run/$name.pid" "$name"); then
            echo "$name running (pid $pid)"
        else
            echo "$name not running"
            rc=1
        fi
    done
    if [ "$rc" = 0 ] && cluster_answers; then
        SLURM_CONF="$CONF" sinfo
        conf_has_accounting && echo "accounting: slurmdbd on 127.0.0.1:$(sed -n 's/^AccountingStoragePort=//p' "$CONF")"
        echo "export SLURM_CONF=$CONF"
    else
        rc=1
    fi
    return "$rc"
}

usage() {
    echo "usage: $0 start|stop|restart|status|env|install [--accounting]" >&2
    exit 2
}

COMMAND="${1:-}"
[ "$#" -gt 0 ] && shift
for arg in "$@"; do
    case "$arg" in
        --accounting) ACCOUNTING=1 ;;
        *) usage ;;
    esac
done

case "$COMMAND" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    install) install ;;
    *) usage ;;
esac
