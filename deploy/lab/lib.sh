# Shared by up.sh and down.sh (sourced, not run). Sets ROOT, LAB and the compose() wrapper.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LAB=$ROOT/deploy/lab
# The compose project; deploy/lab/.env names it too, so `docker compose logs` run inside
# deploy/lab finds the same containers.
export COMPOSE_PROJECT_NAME=canopy-lab
# Which replica's host ports: clc-N publishes EC2 on 127.0.0.1:${PREFIX}N773, admin on ${PREFIX}N774.
export CANOPY_LAB_PORT_PREFIX=${CANOPY_LAB_PORT_PREFIX:-1}
export CANOPY_LAB_IMAGE=${CANOPY_LAB_IMAGE:-canopy-lab:latest}

log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# `docker compose` (v2 plugin) where it exists, else the standalone `docker-compose` (v1).
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    die "neither 'docker compose' nor 'docker-compose' is installed"
fi
# CANOPY_LAB_HYPERVISOR=libvirt: the nodes run libvirtd and QEMU (docker-compose.libvirt.yml).
export CANOPY_LAB_HYPERVISOR=${CANOPY_LAB_HYPERVISOR:-sim}
COMPOSE_FILES=(-f "$LAB/docker-compose.yml")
[[ $CANOPY_LAB_HYPERVISOR != libvirt ]] || COMPOSE_FILES+=(-f "$LAB/docker-compose.libvirt.yml")
compose() { "${COMPOSE[@]}" -p "$COMPOSE_PROJECT_NAME" "${COMPOSE_FILES[@]}" "$@"; }
