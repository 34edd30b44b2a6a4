#!/usr/bin/env bash
# Brings up the multi-node lab (deploy/lab/README.md): 3 CLC replicas, zones canopy-1a and
# canopy-1b with a CC each, 2 simulated NCs per zone, one container each. Waits until the
# cloud is usable, then prints a canopyrc for the host on stdout (progress goes to stderr)
# and writes it to deploy/lab/canopyrc:
#   deploy/lab/up.sh && source deploy/lab/canopyrc && aws ec2 describe-availability-zones
# Running it again on a running lab keeps the lab's state (containers are recreated only when
# the image changed).
#
# Env: CANOPY_BIN (default target/release/canopy; built with cargo when missing),
# CANOPY_LAB_PORT_PREFIX (default 1: clc-N on 127.0.0.1:1N773 EC2, 1N774 admin),
# CANOPY_LAB_MIRROR (Debian mirror for the base image), CANOPY_LAB_WAIT_SECS (default 120),
# CANOPY_LAB_HYPERVISOR (default sim), CANOPY_ADMIN_ACCESS_KEY_ID/_SECRET_ACCESS_KEY (fixed keys).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUITE=bookworm
MIRROR=${CANOPY_LAB_MIRROR:-http://deb.debian.org/debian}
BIN=${CANOPY_BIN:-$ROOT/target/release/canopy}
WAIT_SECS=${CANOPY_LAB_WAIT_SECS:-120}
# Bump to rebuild every base image (e.g. after changing build_base).
BASE_RECIPE=1
DATA=/var/lib/canopy/clc
ZONES=(canopy-1a canopy-1b)
NODES=(canopy-1a/nc-a1 canopy-1a/nc-a2 canopy-1b/nc-b1 canopy-1b/nc-b2)
TMP=$(mktemp -d "${TMPDIR:-/var/tmp}/canopy-lab.XXXXXX")

cleanup() {
    # debootstrap unmounts what it mounted; make sure before deleting its tree.
    grep -o " $TMP/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null || true
    rm -rf --one-file-system "$TMP"
}
trap cleanup EXIT

# Whether the binary links libvirt (was built with the libvirt driver). ldd's output is read
# whole: `ldd | grep -q` under pipefail fails whenever grep exits before ldd has written its
# last line (ldd dies of SIGPIPE), which on a busy machine is a few runs in a hundred.
links_libvirt() {
    local libs
    libs=$(ldd "$1" 2>/dev/null) || return 1
    [[ $libs == *libvirt.so* ]]
}

# The Debian packages the base needs beyond minbase. ca-certificates: the CLC checks https
# image locations (RegisterImage) against the system's CA certificates. libvirt0 when the
# binary was built with the libvirt driver.
base_packages() {
    echo ca-certificates
    if links_libvirt "$BIN"; then echo libvirt0; fi
}

# canopy-lab-base:SUITE-HASH, debootstrapped and imported once; the tag changes with the recipe.
build_base() {
    local base=$1 pkgs=$2 rootfs=$TMP/rootfs
    if ! command -v debootstrap >/dev/null; then
        command -v apt-get >/dev/null || die "debootstrap is missing (and there is no apt-get)"
        log "installing debootstrap"
        { apt-get install -y debootstrap || { apt-get update && apt-get install -y debootstrap; }; } \
            >"$TMP/apt.log" 2>&1 || {
            tail -20 "$TMP/apt.log" >&2
            die "apt-get install debootstrap failed"
        }
    fi
    log "building $base: debootstrap --variant=minbase $SUITE ${pkgs:+(+ $pkgs)} from $MIRROR"
    if ! debootstrap --variant=minbase ${pkgs:+--include="${pkgs// /,}"} \
        "$SUITE" "$rootfs" "$MIRROR" >"$TMP/debootstrap.log" 2>&1; then
        tail -20 "$TMP/debootstrap.log" >&2
        die "debootstrap failed (its last lines above; is $MIRROR reachable?)"
    fi
    # What a container never needs: package caches and lists, documentation.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    tar --numeric-owner -C "$rootfs" -c . |
        docker import --message "canopy lab base: debootstrap minbase $SUITE $pkgs" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - "$base" >/dev/null
    rm -rf --one-file-system "$rootfs"
}

# Runs `canopy admin --json ARGS` inside clc-1 with its own canopyrc; prints the JSON.
admin_json() {
    docker exec "$CLC1" sh -c ". $DATA/canopyrc && exec canopy admin --json \"\$@\"" sh "$@"
}

# Succeeds when the group has a leader and 3 voters, both zones are available and all four
# nodes are healthy in their zone; otherwise prints what is missing.
cloud_ready() {
    local cluster zones nodes
    cluster=$(admin_json cluster 2>&1) || { echo "cluster: $cluster"; return 1; }
    zones=$(admin_json zones 2>&1) || { echo "zones: $zones"; return 1; }
    nodes=$(admin_json nodes 2>&1) || { echo "nodes: $nodes"; return 1; }
    python3 - "$cluster" "$zones" "$nodes" "${ZONES[*]}" "${NODES[*]}" <<'EOF'
import json, sys
cluster, zones, nodes = (json.loads(a) for a in sys.argv[1:4])
want_zones, want_nodes = sys.argv[4].split(), sys.argv[5].split()
missing = []
voters = [m for m in cluster["members"] if m["voter"]]
if cluster.get("leader") is None or len(voters) != 3:
    missing.append(f"leader {cluster.get('leader')} with {len(voters)}/3 voters")
up = {z["zone"] for z in zones if z["available"]}
missing += [f"zone {z}" for z in want_zones if z not in up]
healthy = {f'{n["zone"]}/{n["node_id"]}' for n in nodes if n["healthy"]}
missing += [f"node {n}" for n in want_nodes if n not in healthy]
if missing:
    print("waiting for: " + ", ".join(missing))
    sys.exit(1)
EOF
}

# 1. The binary.
if [[ ! -x $BIN ]]; then
    log "no $BIN: cargo build --release -p canopy"
    (cd "$ROOT" && cargo build --release -p canopy)
fi
case $CANOPY_LAB_HYPERVISOR in
sim) ;;
libvirt)
    links_libvirt "$BIN" ||
        die "CANOPY_LAB_HYPERVISOR=libvirt needs a canopy built with --features libvirt ($BIN is not)"
    ;;
*) die "CANOPY_LAB_HYPERVISOR=$CANOPY_LAB_HYPERVISOR: sim or libvirt" ;;
esac

# 2. The base image (cached: built only when its tag is missing).
PKGS=$(base_packages | tr '\n' ' ' | sed 's/ $//')
BASE=canopy-lab-base:$SUITE-$(printf '%s\n' "$BASE_RECIPE" "$SUITE" "$PKGS" | sha256sum | cut -c1-12)
if docker image inspect "$BASE" >/dev/null 2>&1; then
    log "base image $BASE: cached"
else
    build_base "$BASE" "$PKGS"
fi

# With real guests, the nodes need libvirtd and QEMU: a layer on the base with them (apt in
# a build container; debootstrap cannot configure libvirt's packages in its chroot).
if [[ $CANOPY_LAB_HYPERVISOR == libvirt ]]; then
    LV_PKGS="libvirt-daemon-system qemu-system-x86 qemu-utils"
    LV_BASE=canopy-lab-libvirt:${BASE#canopy-lab-base:}-$(sha256sum <<<"$LV_PKGS" | cut -c1-8)
    if ! docker image inspect "$LV_BASE" >/dev/null 2>&1; then
        log "building $LV_BASE: $BASE + $LV_PKGS (apt, a few minutes)"
        mkdir -p "$TMP/lv"
        printf 'FROM %s\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends %s && rm -rf /var/lib/apt/lists/*\n' \
            "$BASE" "$LV_PKGS" >"$TMP/lv/Dockerfile"
        docker build -q -t "$LV_BASE" "$TMP/lv" >/dev/null || die "building $LV_BASE failed"
    fi
    BASE=$LV_BASE
fi

# 3. The lab image: the binary on the base, in a build context holding only the binary.
log "image $CANOPY_LAB_IMAGE from $BIN"
mkdir "$TMP/context"
cp "$BIN" "$TMP/context/canopy"
cp "$LAB/lab-entry.sh" "$TMP/context/lab-entry.sh"
docker build -q --build-arg BASE="$BASE" -t "$CANOPY_LAB_IMAGE" \
    -f "$LAB/Dockerfile" "$TMP/context" >/dev/null

# 4. The lab's CA (kept in deploy/lab/.pki until down.sh) and the certificates of the CLC
# replicas (with the CA key: they sign joining nodes) and of the CCs.
PKI=$LAB/.pki
if [[ ! -f $PKI/ca/ca.key ]]; then
    log "creating the lab's CA and the CLCs' and CCs' certificates in $PKI"
    rm -rf "$PKI"
    "$BIN" ca init --dir "$PKI/ca" --name canopy-lab >/dev/null
    for n in 1 2 3; do
        "$BIN" ca issue --ca-dir "$PKI/ca" --role clc --name "$n" --san "clc-$n" \
            --out "$PKI/clc-$n" --with-ca-key >/dev/null
    done
    "$BIN" ca issue --ca-dir "$PKI/ca" --role zone --name canopy-1a --san cc-a --out "$PKI/cc-a" >/dev/null
    "$BIN" ca issue --ca-dir "$PKI/ca" --role zone --name canopy-1b --san cc-b --out "$PKI/cc-b" >/dev/null
fi

# 5. The containers: the control plane first, then the nodes, each joining with a token of
# its own the first time (the token is kept, so a later up.sh leaves the node as it is).
log "starting the control plane (${COMPOSE[*]} -p $COMPOSE_PROJECT_NAME up -d clc-1 clc-2 clc-3 cc-a cc-b)"
compose up -d --remove-orphans clc-1 clc-2 clc-3 cc-a cc-b >&2
# Images superseded by this build, once no container uses them.
docker image prune -f --filter label=canopy-lab >/dev/null
CLC1=$(compose ps -q clc-1)
[[ -n $CLC1 ]] || die "no clc-1 container"
started=$SECONDS
until docker exec "$CLC1" test -s "$DATA/canopyrc" 2>/dev/null && admin_json cluster >/dev/null 2>&1; do
    ((SECONDS - started < WAIT_SECS)) || { compose logs --no-color --tail 20 >&2; die "no leader within ${WAIT_SECS}s"; }
    sleep 1
done
for entry in "${NODES[@]}"; do
    zone=${entry%/*} node=${entry#*/}
    var=CANOPY_LAB_JOIN_$(tr 'a-z-' 'A-Z_' <<<"$node")
    if [[ ! -s $PKI/join-$node ]]; then
        admin_json create-join-token --zone "$zone" --description "lab node $node" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])' >"$PKI/join-$node"
    fi
    export "$var=$(cat "$PKI/join-$node")"
done
log "starting the nodes (they join with their tokens)"
compose up -d >&2

# 6. Wait until the cloud is usable.
started=$SECONDS
status="clc-1 has no canopyrc yet"
until docker exec "$CLC1" test -s "$DATA/canopyrc" 2>/dev/null && status=$(cloud_ready); do
    exited=$(docker ps -a -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
        --filter status=exited --filter status=dead)
    if [[ -n $exited ]] || ((SECONDS - started > WAIT_SECS)); then
        compose ps >&2
        compose logs --no-color --tail 20 >&2
        [[ -z $exited ]] || die "a container exited (logs above; ${COMPOSE[*]} logs SERVICE)"
        die "the lab was not ready within ${WAIT_SECS}s: $status"
    fi
    sleep 1
done
log "ready after $((SECONDS - started))s: leader elected, 3 voters, zones ${ZONES[*]}, 4 nodes healthy"

# Every replica must hand out the same keys (the first leader creates them in the log).
for n in 2 3; do
    cid=$(compose ps -q "clc-$n")
    for _ in $(seq 1 30); do docker exec "$cid" test -s "$DATA/canopyrc" && break; sleep 1; done
    [[ $(docker exec "$cid" grep AWS_ACCESS_KEY_ID "$DATA/canopyrc") == \
        $(docker exec "$CLC1" grep AWS_ACCESS_KEY_ID "$DATA/canopyrc") ]] ||
        die "clc-$n does not have clc-1's access key"
done

# With real guests: the test guest (deploy/guest), built on the host and uploaded through
# the leader's admin API once (uploads are served by the leader only): the kernel, the
# initramfs, and the machine image that boots with them.
if [[ $CANOPY_LAB_HYPERVISOR == libvirt ]] &&
    ! grep -q '"name": *"canopy-test-guest"' <<<"$(admin_json images)"; then
    "$ROOT/deploy/guest/build-test-guest.sh" "$ROOT/target/test-guest" >&2
    leader=$(admin_json cluster | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
    LEADER=$(compose ps -q "clc-$leader")
    docker exec "$LEADER" mkdir -p /tmp/test-guest
    docker cp "$ROOT/target/test-guest/." "$LEADER:/tmp/test-guest/"
    upload() {
        docker exec "$LEADER" sh -c ". $DATA/canopyrc && exec canopy admin --json upload-image \"\$@\" --public" sh "$@" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["image_id"])'
    }
    eki=$(upload /tmp/test-guest/vmlinuz --name canopy-test-guest-kernel)
    eri=$(upload /tmp/test-guest/initrd.gz --name canopy-test-guest-ramdisk)
    emi=$(upload /tmp/test-guest/disk.qcow2 --name canopy-test-guest --kernel-id "$eki" --ramdisk-id "$eri")
    log "test guest registered: $emi (kernel $eki, ramdisk $eri)"
fi

# 7. The canopyrc for the host: clc-1's, with its published ports.
P=$CANOPY_LAB_PORT_PREFIX
{
    echo "# Canopy lab (deploy/lab): 3 CLC replicas, zones ${ZONES[*]}, 4 nodes ($CANOPY_LAB_HYPERVISOR)."
    echo "# The other replicas' EC2 APIs: http://127.0.0.1:${P}2773, http://127.0.0.1:${P}3773"
    echo "# Same keys on every replica; admin tokens are per replica, e.g. clc-2's:"
    echo "#   (cd deploy/lab && ${COMPOSE[*]} exec -T clc-2 cat $DATA/admin-token)"
    docker exec "$CLC1" cat "$DATA/canopyrc" | grep '^export' |
        sed -e "s|^export AWS_ENDPOINT_URL_EC2=.*|export AWS_ENDPOINT_URL_EC2='http://127.0.0.1:${P}1773'|" \
            -e "s|^export CANOPY_ADMIN_ENDPOINT=.*|export CANOPY_ADMIN_ENDPOINT='http://127.0.0.1:${P}1774'|"
} >"$TMP/canopyrc"
install -m 600 "$TMP/canopyrc" "$LAB/canopyrc"

# The published EC2 port must answer from the host (an unsigned request gets an EC2 error).
python3 - "http://127.0.0.1:${P}1773/" <<'EOF' || die "the EC2 API is not reachable on the host"
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=5)
except urllib.error.HTTPError:
    pass
EOF

log "lab up in ${SECONDS}s; logs: (cd deploy/lab && ${COMPOSE[*]} logs -f clc-1); stop: deploy/lab/down.sh"
log "canopyrc (also in deploy/lab/canopyrc):"
cat "$LAB/canopyrc"
