#!/usr/bin/env bash
# Tears the lab down: its containers, its network and its volumes (all CLC state), and
# deploy/lab/canopyrc. The images stay, so the next up.sh is fast; `down.sh --images` also
# removes canopy-lab:latest and every canopy-lab-base image (the next up.sh debootstraps again).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case ${1:-} in
    "" | --images) ;;
    *) die "usage: $0 [--images]" ;;
esac

log "removing the lab's containers, network and volumes"
compose down --volumes --remove-orphans >&2
rm -f "$LAB/canopyrc"
# The lab's CA and certificates go with the state that knew them.
rm -rf "$LAB/.pki"

if [[ ${1:-} == --images ]]; then
    log "removing the lab's images"
    docker image rm "$CANOPY_LAB_IMAGE" >&2 || true
    docker images --format '{{.Repository}}:{{.Tag}}' canopy-lab-base | xargs -r docker image rm >&2
    docker image prune -f --filter label=canopy-lab >/dev/null
fi
log "lab down"
