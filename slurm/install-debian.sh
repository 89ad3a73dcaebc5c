#!/usr/bin/env bash
# Install SLURM (slurm-wlm: slurmctld, slurmd, sbatch, srun, ...) and munge from Debian's
# packages, when `sbatch` is not already on PATH. Needs root and apt-get; installs nothing else
# and starts nothing (slurm/cluster.sh starts a private single-node cluster).
set -euo pipefail

if command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 \
        && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    echo "SLURM is already installed ($(command -v sbatch))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install slurm-wlm and munge with this system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "error: installing SLURM needs root (or sudo)" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# The packages' own services are not started here (no init system is assumed).
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) and munge"
