#!/usr/bin/env bash
# Stop the one-node SLURM started by start.sh (by pidfile). --keep-munge leaves munged up.
set -euo pipefail

stop_pidfile() {  # name pidfile
    local pid
    [[ -f $2 ]] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        echo "[slurm/local/stop.sh] stopping $1 (pid $pid)" >&2
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$2"
}

stop_pidfile slurmd /run/slurm/slurmd.pid
stop_pidfile slurmctld /run/slurm/slurmctld.pid
[[ ${1:-} == --keep-munge ]] || stop_pidfile munged /run/munge/munged.pid
