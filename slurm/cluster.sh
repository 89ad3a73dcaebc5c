#!/usr/bin/env bash
# Start, stop or inspect a private single-node SLURM cluster on 127.0.0.1 (munged, slurmctld,
# slurmd), for flsl's tests and for trying `flsl pretrain --nodes` on one machine.
#
#   slurm/cluster.sh start    generate a munge key and slurm.conf, start the daemons, wait until
#                             the node is idle; prints `export SLURM_CONF=...`
#   slurm/cluster.sh stop     stop the daemons started by `start` (by their pid files)
#   slurm/cluster.sh status   say whether the daemons run and show `sinfo`
#   slurm/cluster.sh env      print `export SLURM_CONF=...` (use with eval)
#
# Everything lives in FLSL_SLURM_DIR (default /tmp/flsl-slurm-$UID); ports are private
# (FLSL_SLURM_PORT, default 16817, and the next one). The node declares FLSL_SLURM_CPUS CPUs
# (default 16); partition `debug` (default) is preempted by partition `urgent`, with
# FLSL_SLURM_GRACE seconds (default 30) to save. Installs nothing: see
# slurm/install-debian.sh. Needs root (slurmd starts jobs as their users).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${FLSL_SLURM_DIR:-/tmp/flsl-slurm-$(id -u)}"
CTLD_PORT="${FLSL_SLURM_PORT:-16817}"
SLURMD_PORT="$((CTLD_PORT + 1))"
NODE="$(hostname -s)"
CONF="$STATE_DIR/slurm.conf"
CPUS="${FLSL_SLURM_CPUS:-16}"  # CPUs the node declares (config_overrides)
GRACE="${FLSL_SLURM_GRACE:-30}"  # seconds a preempted job has between SIGTERM and SIGKILL
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket"

die() { echo "cluster.sh: error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

need() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
        command -v "$tool" >/dev/null 2>&1 || \
            die "$tool not found; install SLURM first (bash slurm/install-debian.sh on Debian/Ubuntu)"
    done
    [ "$(id -u)" -eq 0 ] || die "starting slurmd needs root"
}

write_config() {
    mkdir -p "$STATE_DIR"/{munge,ctld,slurmd,log}
    chmod 700 "$STATE_DIR" "$STATE_DIR/munge"
    if [ ! -s "$STATE_DIR/munge/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$STATE_DIR/munge/munge.key" --force
        else
            dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 400 "$STATE_DIR/munge/munge.key"
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@NODE@|$NODE|g" -e "s|@CPUS@|$CPUS|g" -e "s|@GRACE@|$GRACE|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@USER@|$(id -un)|g" \
        "$HERE/slurm.conf.template" > "$CONF"
}

wait_idle() {
    local deadline=$((SECONDS + ${1:-60})) state=""
    while [ $SECONDS -lt $deadline ]; do
        state="$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1 || true)"
        case "$state" in
            idle*|mixed*|allocated*|completing*) return 0 ;;
            down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    echo "cluster.sh: the node did not become idle (state: '${state:-no answer}'); logs:" >&2
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    return 1
}

start() {
    need
    export SLURM_CONF="$CONF"
    if alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid" && alive "$STATE_DIR/munge/munged.pid"; then
        wait_idle 30
        echo "SLURM cluster already running in $STATE_DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop >/dev/null 2>&1 || true
    write_config
    munged --force --key-file="$STATE_DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed" \
        || die "munged did not start; see $STATE_DIR/log/munged.log"
    # -i: ignore (possibly stale) saved state from an earlier cluster in this dir.
    slurmctld -f "$CONF" -i || die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log"
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $STATE_DIR/log/slurmd.log"
    wait_idle 60 || die "the cluster did not come up"
    echo "SLURM cluster running in $STATE_DIR (node $NODE, ports $CTLD_PORT/$SLURMD_PORT)"
    echo "export SLURM_CONF=$CONF"
}

stop_one() {  # stop_one PIDFILE NAME
    local pidfile="$1" pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    echo "stopped $2 ($pid)"
}

stop() {
    export SLURM_CONF="$CONF"
    if [ -f "$CONF" ] && alive "$STATE_DIR/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_one "$STATE_DIR/slurmd.pid" slurmd
    stop_one "$STATE_DIR/slurmctld.pid" slurmctld
    stop_one "$STATE_DIR/munge/munged.pid" munged
}

status() {
    export SLURM_CONF="$CONF"
    local ok=0
    for daemon in munge/munged slurmctld slurmd; do
        if alive "$STATE_DIR/$daemon.pid"; then
            echo "${daemon##*/}: running ($(cat "$STATE_DIR/$daemon.pid"))"
        else
            echo "${daemon##*/}: not running"; ok=1
        fi
    done
    [ $ok -eq 0 ] && sinfo
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
