#!/usr/bin/env bash
# Tests deploy/node/install.sh for real, in a throwaway Debian bookworm container: a dry run
# and an install into --root change nothing outside their directory; the real install puts
# the packages (with apt), the binary, the config (with a join token from a cloud controller
# running in the container) and the unit in place; a second run changes nothing; `canopy nc
# doctor` then reports libvirtd stopped as a failure and the CC unchecked (no certificate
# yet); the node joins with its token (its certificate lands in /etc/canopy/tls, the token is
# spent, the node registers); the doctor then reaches the CC with the node's certificate.
# Prints the transcript; exits 0 when every check passed.
#
#   deploy/node/test-install.sh [CANOPY_BINARY]     (default $CANOPY_BIN, else target/release/canopy)
#
# Needs Docker and root (nothing is pulled from a registry). The container is the lab's base
# image (canopy-lab-base:*, deploy/lab/up.sh builds it) when the binary runs in one, else a
# minimal debootstrapped bookworm (with libvirt0 when the binary links it) imported as
# canopy-node-test-base:bookworm[-libvirt0] (the first time only, about a minute). The
# packages come from the Debian mirror. Env: CANOPY_NODE_TEST_IMAGE
# (the image to use), CANOPY_LAB_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${1:-${CANOPY_BIN:-$REPO/target/release/canopy}}
MIRROR=${CANOPY_LAB_MIRROR:-http://deb.debian.org/debian}
log() { printf '[test-install %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

[[ -x $BIN ]] || die "no canopy binary at $BIN (build it, or give its path)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
command -v docker >/dev/null || die "docker is missing"
started=$(date +%s)

# The binary runs in the container before install.sh puts the packages in (the cloud
# controller, the join token), so the image must hold the libraries it links: a lab base in
# which it runs, else our own base with libvirt0 when it links libvirt.
runs_in() { docker run --rm -v "$BIN:/bin-in/canopy:ro" "$1" /bin-in/canopy --version >/dev/null 2>&1; }
image=${CANOPY_NODE_TEST_IMAGE:-}
if [[ -z $image ]]; then
    for candidate in $(docker images --format '{{.Repository}}:{{.Tag}}' canopy-lab-base); do
        if runs_in "$candidate"; then image=$candidate && break; fi
    done
fi
if [[ -z $image ]]; then
    pkgs=
    [[ $(ldd "$BIN" 2>/dev/null) != *libvirt.so* ]] || pkgs=libvirt0
    image=canopy-node-test-base:bookworm${pkgs:+-$pkgs}
    if ! docker image inspect "$image" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || die "no base image and no debootstrap to build one"
        log "building $image: debootstrap --variant=minbase bookworm ${pkgs:+(+ $pkgs) }from $MIRROR"
        tree=$(mktemp -d "${TMPDIR:-/var/tmp}/canopy-node-test.XXXXXX")
        trap 'rm -rf --one-file-system "$tree"' EXIT
        debootstrap --variant=minbase ${pkgs:+--include=$pkgs} bookworm "$tree" "$MIRROR" >"$tree.log" 2>&1 ||
            { tail -20 "$tree.log" >&2; die "debootstrap failed"; }
        rm -f "$tree.log"
        rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
        tar --numeric-owner -C "$tree" -c . | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            - "$image" >/dev/null
    fi
    runs_in "$image" || die "$BIN does not run in $image"
fi
log "container from $image; binary $BIN ($("$BIN" --version))"

# The test proper, run in the container: /src is the repository (read-only), /bin-in/canopy
# the binary under test.
inner=$(
    cat <<'INNER'
set -uo pipefail
failures=0
step() { printf '\n=== %s\n' "$*"; }
check() { # check DESCRIPTION COMMAND...: runs it, records the outcome
    local what=$1; shift
    if "$@"; then echo "PASS: $what"; else echo "FAIL: $what"; failures=$((failures + 1)); fi
}
has() { grep -qE -- "$2" "$1"; }
lacks() { ! grep -qE -- "$2" "$1"; }
install=/src/deploy/node/install.sh

step "a cloud controller in the container, with the cloud CA; a join token from it"
/bin-in/canopy ca init --dir /tmp/pki/ca
/bin-in/canopy ca issue --ca-dir /tmp/pki/ca --role clc --name 1 --out /tmp/pki/clc --with-ca-key
/bin-in/canopy ca issue --ca-dir /tmp/pki/ca --role zone --name canopy-1a --out /tmp/pki/cc
/bin-in/canopy clc --data-dir /tmp/clc --tls-dir /tmp/pki/clc >/tmp/clc.log 2>&1 &
for _ in $(seq 100); do [ -s /tmp/clc/canopyrc ] && break; sleep 0.2; done
check "the cloud controller is up" test -s /tmp/clc/canopyrc
token=$(set -a; . /tmp/clc/canopyrc; /bin-in/canopy admin create-join-token --zone canopy-1a | tail -1)
check "a join token" sh -c "echo '$token' | grep -qE '^canopy1\.'"
args=(--cc https://127.0.0.1:8775 --node-id hv-test --join-token "$token" /bin-in/canopy)

step "install.sh --dry-run: says what it would do, changes nothing"
"$install" --dry-run "${args[@]}" 2>&1 | tee /tmp/dry.log
check "dry run exits 0" test "${PIPESTATUS[0]}" -eq 0
check "dry run would install the packages" has /tmp/dry.log 'would run: .*apt-get .*install .*libvirt-daemon-system'
check "dry run would write the unit" has /tmp/dry.log 'would write /etc/systemd/system/canopy-nc.service'
check "dry run changed nothing" test ! -e /etc/canopy -a ! -e /usr/local/bin/canopy -a ! -e /etc/systemd/system/canopy-nc.service

step "install.sh --root /tmp/root: files under it only, no service started"
"$install" --root /tmp/root --no-packages "${args[@]}" 2>&1 | tee /tmp/root.log
check "--root exits 0" test "${PIPESTATUS[0]}" -eq 0
check "--root wrote the binary, config and unit under it" test -x /tmp/root/usr/local/bin/canopy -a -f /tmp/root/etc/canopy/nc.toml -a -f /tmp/root/etc/systemd/system/canopy-nc.service
check "--root touched nothing outside it" test ! -e /etc/canopy -a ! -e /usr/local/bin/canopy
check "--root started no service" has /tmp/root.log 'services: not started'

step "install.sh: packages with apt, binary, config, unit"
t0=$(date +%s)
"$install" "${args[@]}" 2>&1 | tee /tmp/install.log
check "install exits 0" test "${PIPESTATUS[0]}" -eq 0
echo "(install took $(($(date +%s) - t0)) s)"
for p in libvirt-daemon-system qemu-system-x86 qemu-utils libvirt0; do
    check "package $p installed" test "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed
done
check "binary in place and runs" /usr/local/bin/canopy --version
check "config has the CC" has /etc/canopy/nc.toml '^cc = "https://127.0.0.1:8775"$'
check "config has the node id" has /etc/canopy/nc.toml '^node_id = "hv-test"$'
check "config has the join token, readable by root only" sh -c "grep -q '^join_token = \"canopy1\.' /etc/canopy/nc.toml && [ \"\$(stat -c %a /etc/canopy/nc.toml)\" = 600 ]"
check "the TLS directory exists, empty, 0700" sh -c '[ "$(stat -c %a /etc/canopy/tls)" = 700 ] && [ -z "$(ls -A /etc/canopy/tls)" ]'
check "config is commented" has /etc/canopy/nc.toml '^# The zone.s cluster controller'
check "unit runs canopy nc with the config" has /etc/systemd/system/canopy-nc.service '^ExecStart=/usr/local/bin/canopy nc --config /etc/canopy/nc.toml$'
check "unit restarts on failure, after libvirtd" sh -c 'grep -q "^Restart=on-failure" /etc/systemd/system/canopy-nc.service && grep -q "^After=.*libvirtd.service" /etc/systemd/system/canopy-nc.service'
check "state dir exists" test -d /var/lib/canopy/nc
check "no systemd here: nothing started, and it says so" has /tmp/install.log 'systemd is not running here'
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /etc/systemd/system/canopy-nc.service >/tmp/verify.log 2>&1
    cat /tmp/verify.log
    check "systemd-analyze verify finds nothing wrong with the unit" lacks /tmp/verify.log 'canopy-nc'
    # The control: verify does complain here, about a unit with a mistake.
    sed 's/^Restart=/Restrat=/' /etc/systemd/system/canopy-nc.service >/tmp/broken.service
    check "systemd-analyze verify catches a broken copy" sh -c \
        'systemd-analyze verify /tmp/broken.service 2>&1 | grep -q Restrat'
    systemd-analyze security --offline=true /etc/systemd/system/canopy-nc.service 2>/dev/null | tail -1
fi

step "install.sh again: idempotent, the edited config is kept"
echo '# edited by hand' >>/etc/canopy/nc.toml
"$install" "${args[@]}" 2>&1 | tee /tmp/again.log
check "second run exits 0" test "${PIPESTATUS[0]}" -eq 0
check "second run installs no package" has /tmp/again.log 'already installed'
check "second run leaves binary and unit unchanged" sh -c "grep -q 'canopy: unchanged' /tmp/again.log && grep -q 'canopy-nc.service: unchanged' /tmp/again.log"
check "second run keeps the config" has /etc/canopy/nc.toml '^# edited by hand$'

step "canopy nc doctor: libvirtd not running, no certificate yet"
/usr/local/bin/canopy nc doctor --config /etc/canopy/nc.toml | tee /tmp/doctor1.log
check "doctor exits 1" test "${PIPESTATUS[0]}" -eq 1
check "doctor: the CC is not asked before the node joined" has /tmp/doctor1.log '^SKIP +cluster controller +no certificate yet'
check "doctor: libvirtd not reachable, or no driver in this build" has /tmp/doctor1.log '^(FAIL +libvirt +libvirtd is not reachable|SKIP +libvirt +not checked: this build has no libvirt driver)'
check "doctor: QEMU and qemu-img found" sh -c "grep -q '^OK *qemu-system' /tmp/doctor1.log && grep -q '^OK *qemu-img' /tmp/doctor1.log"
check "doctor: a fix under every failure" sh -c '[ "$(grep -c "^FAIL" /tmp/doctor1.log)" -le "$(grep -c "^ *fix: " /tmp/doctor1.log)" ]'

step "the node joins with its token"
/usr/local/bin/canopy cc --zone canopy-1a --listen 127.0.0.1:8775 --clc https://127.0.0.1:8776 \
    --tls-dir /tmp/pki/cc >/tmp/cc.log 2>&1 &
cc=$!
# The simulated driver: this container may not run guests; the join is the same.
CANOPY_LOG=info /usr/local/bin/canopy nc --config /etc/canopy/nc.toml --hypervisor sim >/tmp/nc.log 2>&1 &
nc=$!
for _ in $(seq 150); do grep -q 'registered with the cluster controller' /tmp/nc.log && break; sleep 0.2; done
check "the node joined and registered" has /tmp/nc.log 'registered with the cluster controller'
check "its certificate and key are in /etc/canopy/tls, the key root's only" sh -c \
    'test -s /etc/canopy/tls/tls.crt -a -s /etc/canopy/tls/ca.crt && [ "$(stat -c %a /etc/canopy/tls/tls.key)" = 600 ]'
(set -a; . /tmp/clc/canopyrc; /bin-in/canopy admin join-tokens; /bin-in/canopy admin certificates) | tee /tmp/pki.log
check "the token is spent by hv-test" has /tmp/pki.log 'canopy-1a +[^ ]+ +hv-test'
check "the cloud lists its certificate" has /tmp/pki.log 'node/hv-test +canopy-1a'
kill "$nc" 2>/dev/null; wait "$nc" 2>/dev/null

step "canopy nc doctor: with a CC (and libvirtd, when it starts in this container)"
mkdir -p /run/libvirt
(virtlogd -d && libvirtd -d) >/tmp/libvirtd.log 2>&1 || true
for _ in $(seq 50); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
/usr/local/bin/canopy nc doctor --config /etc/canopy/nc.toml | tee /tmp/doctor2.log
check "doctor: the CC answers the node's certificate" has /tmp/doctor2.log '^OK +cluster controller +https://127.0.0.1:8775 answered'
check "doctor: the clock agrees with the CC's" has /tmp/doctor2.log '^OK +clock vs CC'
check "doctor: the clock's sync is said (unknown without systemd)" has /tmp/doctor2.log '^(OK|WARN|FAIL) +clock sync'
if [ -S /run/libvirt/libvirt-sock ] && ldd /usr/local/bin/canopy | grep libvirt >/dev/null; then
    check "doctor: libvirtd answers" has /tmp/doctor2.log '^OK +libvirt +libvirtd answers'
else
    echo "(libvirtd did not start in this container, or the binary has no libvirt driver: libvirt stays unchecked)"
    tail -3 /tmp/libvirtd.log
fi
kill "$cc" 2>/dev/null

printf '\n%s\n' "$failures check(s) failed"
exit $((failures > 0))
INNER
)

status=0
docker run --rm -i --network bridge \
    -v "$REPO:/src:ro" -v "$BIN:/bin-in/canopy:ro" \
    -e "CANOPY_LOG=warn" "$image" bash -c "$inner" || status=$?
log "done in $(($(date +%s) - started)) s: $([[ $status == 0 ]] && echo 'every check passed' || echo "FAILED (exit $status)")"
exit "$status"
