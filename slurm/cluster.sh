#!/usr/bin/env bash
# Start, stop or inspect a private SLURM cluster on one machine (munged, slurmctld, one slurmd
# per node), for flsl's tests and for trying `flsl pretrain --nodes` on one machine.
#
#   slurm/cluster.sh start [--nodes N]
#                             generate a munge key and slurm.conf, start the daemons, wait until
#                             every node is idle; prints `export SLURM_CONF=...`. One node (the
#                             default) is named `hostname -s`, address 127.0.0.1. N > 1 nodes are
#                             named n1..nN (n1SUFFIX.. with FLSL_SLURM_NODE_SUFFIX, e.g. -ib:
#                             n1-ib, n2-ib), addresses 127.0.0.2..,
#                             each slurmd on its own port;
#                             their names resolve through lines added to /etc/hosts (marked with
#                             this cluster's dir, removed by `stop`); the CPUs are split between
#                             them
#   slurm/cluster.sh stop     stop the daemons started by `start` (by their pid files)
#   slurm/cluster.sh status   say whether the daemons run and show `sinfo`
#   slurm/cluster.sh env      print `export SLURM_CONF=...` (use with eval)
#
# Everything lives in FLSL_SLURM_DIR (default /tmp/flsl-slurm-$UID); ports are private
# (FLSL_SLURM_PORT, default 16817, and the next N). The nodes declare FLSL_SLURM_CPUS CPUs in all
# (default 16); partition `debug` (default) is preempted by partition `urgent`, with
# FLSL_SLURM_GRACE seconds (default 30) to save. Installs nothing: see
# slurm/install-debian.sh. Needs root (slurmd starts jobs as their users).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${FLSL_SLURM_DIR:-/tmp/flsl-slurm-$(id -u)}"
CTLD_PORT="${FLSL_SLURM_PORT:-16817}"
SLURMD_PORT="$((CTLD_PORT + 1))"
HOST="$(hostname -s)"
CONF="$STATE_DIR/slurm.conf"
CPUS="${FLSL_SLURM_CPUS:-16}"  # CPUs the nodes declare in all (config_overrides)
HOSTS_FILE="${FLSL_HOSTS_FILE:-/etc/hosts}"
HOSTS_MARK="# flsl-slurm $STATE_DIR"  # ends each /etc/hosts line this cluster added
NODES_FILE="$STATE_DIR/nodes"  # the node names of the running cluster, one a line
SUFFIX="${FLSL_SLURM_NODE_SUFFIX:-}"  # after the number in the names of N > 1 nodes (n1-ib, ...)
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
    local count="$1" nodes="" lines="" i name
    [ "$CPUS" -ge "$count" ] || die "FLSL_SLURM_CPUS ($CPUS) is fewer than the $count nodes"
    if [ "$count" -eq 1 ]; then
        nodes="$HOST"
        lines="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN"
    else
        for i in $(seq "$count"); do
            name="n$i$SUFFIX"
            nodes="$nodes${nodes:+,}$name"
            lines="$lines${lines:+\\n}NodeName=$name NodeHostname=$HOST NodeAddr=127.0.0.$((i + 1)) Port=$((SLURMD_PORT + i - 1)) CPUs=$((CPUS / count)) State=UNKNOWN"
        done
    fi
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@NODES@|$nodes|g" -e "s|@NODE_LINES@|$lines|" \
        -e "s|@GRACE@|$GRACE|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@USER@|$(id -un)|g" "$HERE/slurm.conf.template" > "$CONF"
    echo "$nodes" | tr ',' '\n' > "$NODES_FILE"
}

nodes() { cat "$NODES_FILE" 2>/dev/null || true; }

add_hosts() {  # the names n1..nN resolve to their addresses while the cluster runs
    local i
    remove_hosts
    for i in $(seq "$1"); do
        printf '127.0.0.%d n%d%s %s\n' "$((i + 1))" "$i" "$SUFFIX" "$HOSTS_MARK" >> "$HOSTS_FILE"
    done
}

ours() {  # reads /etc/hosts lines; prints those that end with this cluster's mark (with -v: the others)
    # by the end of the line, so that /tmp/flsl-slurm-0 does not take /tmp/flsl-slurm-0-2n's lines
    awk -v mark="$HOSTS_MARK" -v keep="${1:-}" \
        '{ mine = length($0) >= length(mark) && substr($0, length($0) - length(mark) + 1) == mark }
         (keep == "-v") != mine'
}

remove_hosts() {  # only the lines this cluster added (rewritten in place: /etc/hosts may be a mount)
    [ -f "$HOSTS_FILE" ] && [ -n "$(ours < "$HOSTS_FILE")" ] || return 0
    local kept
    kept="$(ours -v < "$HOSTS_FILE")"
    printf '%s\n' "$kept" > "$HOSTS_FILE"
}

wait_idle() {  # every node is up
    local deadline=$((SECONDS + ${1:-60})) state="" node up
    while [ $SECONDS -lt $deadline ]; do
        up=0
        for node in $(nodes); do
            state="$(sinfo -h -N -n "$node" -o %T 2>/dev/null | head -1 || true)"
            case "$state" in
                idle*|mixed*|allocated*|completing*) up=$((up + 1)) ;;
                down*|drain*|fail*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
            esac
        done
        [ "$up" -gt 0 ] && [ "$up" -eq "$(nodes | wc -l)" ] && return 0
        sleep 1
    done
    echo "cluster.sh: node $node did not become idle (state: '${state:-no answer}'); logs:" >&2
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    return 1
}

all_alive() {  # the daemons of a cluster of $1 nodes run
    local node
    alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/munge/munged.pid" || return 1
    [ "$(nodes | wc -l)" -eq "$1" ] || return 1
    for node in $(nodes); do alive "$STATE_DIR/slurmd-$node.pid" || return 1; done
}

start() {
    local count=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) count="${2:-}"; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) count="${1#--nodes=}"; shift ;;
            *) die "unknown option $1 (usage: cluster.sh start [--nodes N])" ;;
        esac
    done
    [[ "$count" =~ ^[1-9][0-9]*$ ]] || die "--nodes takes a number of at least 1, found '$count'"
    need
    export SLURM_CONF="$CONF"
    if all_alive "$count"; then
        wait_idle 30
        echo "SLURM cluster already running in $STATE_DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop >/dev/null 2>&1 || true
    write_config "$count"
    [ "$count" -eq 1 ] || add_hosts "$count"
    munged --force --key-file="$STATE_DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed" \
        || die "munged did not start; see $STATE_DIR/log/munged.log"
    # -i: ignore (possibly stale) saved state from an earlier cluster in this dir.
    slurmctld -f "$CONF" -i || die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log"
    for node in $(nodes); do
        slurmd -f "$CONF" -N "$node" || die "slurmd $node did not start; see $STATE_DIR/log/slurmd-$node.log"
    done
    wait_idle 60 || die "the cluster did not come up"
    echo "SLURM cluster running in $STATE_DIR (nodes $(nodes | paste -sd, -), ports $CTLD_PORT-$((SLURMD_PORT + count - 1)))"
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
    for pidfile in "$STATE_DIR"/slurmd-*.pid "$STATE_DIR/slurmd.pid"; do
        [ -e "$pidfile" ] || continue
        name="${pidfile##*/}"
        stop_one "$pidfile" "${name%.pid}"
    done
    stop_one "$STATE_DIR/slurmctld.pid" slurmctld
    stop_one "$STATE_DIR/munge/munged.pid" munged
    remove_hosts
    rm -f "$NODES_FILE"
}

status() {
    export SLURM_CONF="$CONF"
    local ok=0
    for daemon in munge/munged slurmctld $(nodes | sed 's/^/slurmd-/'); do
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
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start [--nodes N]|stop|status|env" >&2; exit 2 ;;
esac
