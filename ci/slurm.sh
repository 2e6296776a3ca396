#!/usr/bin/env bash
# A single-node SLURM for the dask-jobqueue tests, on a machine without systemd.
#
#   ci/slurm.sh          install (Debian packages) and start munged, slurmctld, slurmd
#   ci/slurm.sh stop     stop the daemons this script started (nothing else)
#   ci/slurm.sh status   say whether a SLURM answers here
#
# Running it twice is fine: it leaves a working SLURM alone. It never rewrites a
# slurm.conf it did not write, so a machine with a real SLURM keeps its own.
# Needs root (or password-less sudo) to install packages and start the daemons.
set -euo pipefail

MARK="# written by daskserve ci/slurm.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/run/daskserve-ci-slurm   # which daemons this script started
LOG_DIR=/var/log/slurm

say() { echo "ci/slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        die "needs root or password-less sudo (installs packages, starts daemons)"
    fi
fi

pidfile() {
    case "$1" in
        munged) echo /run/munge/munged.pid ;;
        *) echo "/run/$1.pid" ;;
    esac
}

running() { # running DAEMON: its pid file names a live process of that name
    local pid
    pid="$(cat "$(pidfile "$1")" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

node_state() {
    sinfo -h -N -o "%t" 2>/dev/null | head -n1
}

slurm_answers() {
    case "$(node_state)" in
        idle*|mix*|alloc*|comp*) return 0 ;;
        *) return 1 ;;
    esac
}

install_packages() {
    local need=()
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    command -v sbatch >/dev/null || need+=(slurm-client)
    command -v munged >/dev/null || need+=(munge)
    [ ${#need[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is missing"
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # "policy-rc.d denied execution of start" is expected without an init system.
    if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; then
        $SUDO apt-get update -q >/dev/null
        $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
}

ensure_hostname_resolves() {
    local host
    host="$(hostname -s)"
    if ! getent hosts "$host" >/dev/null; then
        say "adding $host to /etc/hosts"
        echo "127.0.0.1 $host" | $SUDO tee -a /etc/hosts >/dev/null
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [ -f /etc/munge/munge.key ] || $SUDO /usr/sbin/mungekey --create 2>/dev/null || \
        $SUDO create-munge-key 2>/dev/null || die "no munge key and none could be made"
    $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
    $SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
    $SUDO chmod 0755 /run/munge
    say "starting munged"
    $SUDO runuser -u munge -- /usr/sbin/munged
    $SUDO touch "$STATE_DIR/munged"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer"
}

write_config() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        say "keeping the existing $CONF (not written by this script)"
        return 0
    fi
    local host cpus mem_mb
    host="$(hostname -s)"
    # At least 4 CPUs, so 3 one-core jobs run at once on a 2-core machine
    # (config_overrides accepts more than the hardware has).
    cpus="$(nproc)"
    [ "$cpus" -lt 4 ] && cpus=4
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
    $SUDO mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    $SUDO tee "$CONF" >/dev/null <<EOF
$MARK
ClusterName=daskserve-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_slurm() {
    if ! running slurmctld; then
        say "starting slurmctld"
        $SUDO slurmctld
        $SUDO touch "$STATE_DIR/slurmctld"
    fi
    if ! running slurmd; then
        say "starting slurmd"
        $SUDO slurmd
        $SUDO touch "$STATE_DIR/slurmd"
    fi
    local host state
    host="$(hostname -s)"
    for i in $(seq 100); do
        slurm_answers && return 0
        state="$(node_state)"
        # A node left drained or down by an earlier run comes back here.
        case "$state" in
            drain*|down*|inval*|fail*)
                [ $((i % 10)) -eq 1 ] && \
                    $SUDO scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    die "the node did not become idle (state: '$(node_state)'); see $LOG_DIR/*.log"
}

stop_started() {
    # Jobs first, so no dask worker outlives the daemons that ran it.
    if [ -f "$STATE_DIR/slurmctld" ] && command -v scancel >/dev/null; then
        $SUDO scancel --full --partition=debug 2>/dev/null || true
    fi
    for daemon in slurmd slurmctld munged; do
        [ -f "$STATE_DIR/$daemon" ] || continue
        if running "$daemon"; then
            say "stopping $daemon"
            $SUDO kill -TERM "$(cat "$(pidfile "$daemon")")" || true
            for _ in $(seq 50); do running "$daemon" || break; sleep 0.1; done
        fi
        $SUDO rm -f "$STATE_DIR/$daemon"
    done
}

case "${1:-start}" in
    start)
        $SUDO mkdir -p "$STATE_DIR"
        if slurm_answers; then
            say "SLURM already answers (node $(node_state))"
            exit 0
        fi
        install_packages
        ensure_hostname_resolves
        start_munge
        write_config
        start_slurm
        say "SLURM is up: $(sinfo -h -o '%P %D %c %m %t' | head -n1)"
        ;;
    stop)
        stop_started
        ;;
    status)
        if slurm_answers; then
            say "SLURM answers (node $(node_state))"
        else
            say "no SLURM answers here"
            exit 1
        fi
        ;;
    *)
        die "usage: ci/slurm.sh [start|stop|status]"
        ;;
esac
