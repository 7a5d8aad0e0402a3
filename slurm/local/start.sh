#!/usr/bin/env bash
# Start a one-node SLURM cluster (munge, slurmctld, slurmd) on this machine, by hand
# (no systemd). Idempotent: returns at once when the cluster is already up with this config.
# Needs root. Exit codes: 0 up; 1 failure; 77 cannot run here (not root, cannot apt-get).
# Env: SLURM_LOCAL_PARTITION (default "main", must match slurm/config.yaml),
#      SLURM_LOCAL_MIN_CPUS (default 8: the node declares max(nproc, this) CPUs so that
#      `snakemake --cores 8` jobs fit on small CI machines; task/none does no pinning).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PARTITION=${SLURM_LOCAL_PARTITION:-main}
MIN_CPUS=${SLURM_LOCAL_MIN_CPUS:-8}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)

log() { echo "[slurm/local/start.sh] $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (it installs packages and starts daemons)"
    exit 77
fi

# One start at a time (parallel test sessions): the others wait, then find it running.
exec 9>/run/promptcam-slurm-local.lock
flock 9

# --- 1. packages --------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        log "SLURM is not installed and apt-get is not available"
        exit 77
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
    pkgs=(slurmctld slurmd slurm-client munge)
    log "installing ${pkgs[*]}"
    if ! apt_get install -y --no-install-recommends "${pkgs[@]}"; then
        # package lists missing or stale: refresh once, then retry
        if ! { apt_get update && apt_get install -y --no-install-recommends "${pkgs[@]}"; }; then
            log "apt-get could not install ${pkgs[*]} (offline? no Debian repos?)"
            exit 77
        fi
    fi
fi

# --- 2. config ----------------------------------------------------------------------
cpus=$(nproc)
(( cpus < MIN_CPUS )) && cpus=$MIN_CPUS
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
headroom=$(( mem_mb / 10 > 512 ? mem_mb / 10 : 512 ))
realmem=$(( mem_mb - headroom ))
(( realmem < 1024 )) && realmem=1024

fill() {
    sed -e "s/@HOST@/$HOST/g" -e "s/@CPUS@/$cpus/g" -e "s/@REALMEM@/$realmem/g" \
        -e "s/@PARTITION@/$PARTITION/g" "$1"
}
new_slurm_conf=$(fill "$HERE/slurm.conf.in")
new_gres_conf=$(fill "$HERE/gres.conf.in")

config_same() {
    [[ -f $CONF_DIR/slurm.conf && -f $CONF_DIR/gres.conf ]] \
        && [[ "$(cat "$CONF_DIR/slurm.conf")" == "$new_slurm_conf" ]] \
        && [[ "$(cat "$CONF_DIR/gres.conf")" == "$new_gres_conf" ]]
}

pid_alive() {  # pidfile -> true when its process exists
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1; }

node_ready() {
    case $(node_state) in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

if config_same && pid_alive /run/munge/munged.pid && pid_alive /run/slurm/slurmctld.pid \
    && pid_alive /run/slurm/slurmd.pid && node_ready; then
    log "already running: node $HOST is $(node_state)"
    exit 0
fi

# Stale or different: stop what runs (by pidfile), then start fresh.
if pid_alive /run/slurm/slurmctld.pid || pid_alive /run/slurm/slurmd.pid; then
    log "restarting slurm daemons"
    "$HERE/stop.sh" --keep-munge
fi

mkdir -p "$CONF_DIR" /run/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd
printf '%s\n' "$new_slurm_conf" >"$CONF_DIR/slurm.conf"
printf '%s\n' "$new_gres_conf" >"$CONF_DIR/gres.conf"

# --- 3. munge -----------------------------------------------------------------------
id munge >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! pid_alive /run/munge/munged.pid; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged 9>&-
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
munge -n </dev/null | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# --- 4. slurm daemons ---------------------------------------------------------------
log "starting slurmctld and slurmd (node $HOST, CPUs=$cpus, RealMemory=$realmem MB)"
slurmctld 9>&-  # daemons must not inherit the lock
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
slurmd 9>&-

for _ in $(seq 120); do
    node_ready && break
    case $(node_state) in
        down* | drain* | fail*)
            scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
if ! node_ready; then
    log "node $HOST did not become idle (state: '$(node_state)'); logs:"
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
fi
log "up: partition $PARTITION, node $HOST is $(node_state)"
