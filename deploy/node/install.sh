#!/usr/bin/env bash
# Installs Canopy's node controller on a Debian or Ubuntu hypervisor host
# (deploy/node/README.md):
#
#   deploy/node/install.sh [OPTIONS] [CANOPY_BINARY]
#
# 1. the Debian packages the node needs (libvirt, QEMU, qemu-img), with apt-get;
# 2. the canopy binary (CANOPY_BINARY, or $CANOPY_BIN, default target/release/canopy of this
#    repository; nothing is built here) as /usr/local/bin/canopy;
# 3. /etc/canopy/nc.toml from deploy/config/nc.toml, filled from --cc, --node-id,
#    --advertise and --join-token; an existing one is never overwritten; the TLS directory
#    /etc/canopy/tls (0700), which the node fills when it joins;
# 4. the systemd unit canopy-nc.service (`canopy nc --config /etc/canopy/nc.toml`);
# 5. on a host running systemd: libvirtd enabled and started, canopy-nc enabled, and started
#    (or restarted when its binary or unit changed) once the config names a CC.
#
# Running it again changes only what differs. Options:
#   --cc URL          the zone's cluster controller, e.g. http://cc-1a.example:8775
#   --node-id ID      this node's id (default: the host name)
#   --advertise URL   the URL the CC reaches this node at, e.g. http://hv-01.example:8777;
#                     the node then listens on 0.0.0.0 at that port
#   --hypervisor H    libvirt (default), auto or sim
#   --join-token T    the join token the node presents once (`canopy admin
#                     create-join-token`); the config is then readable by root only
#   --root DIR        install into DIR (a chroot, an image, a scratch directory) instead of
#                     /; also DESTDIR=DIR. Starts no service; installs packages only when DIR
#                     has apt-get (in a chroot, as root)
#   --dry-run         say what would be done, change nothing
#   --no-packages     do not install packages
#   --no-start        do not enable or start services
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TEMPLATE=$REPO/deploy/config/nc.toml
PACKAGES=(libvirt-daemon-system qemu-system-x86 qemu-utils libvirt0)
UNIT_NAME=canopy-nc.service
CONFIG=/etc/canopy/nc.toml
BIN_PATH=/usr/local/bin/canopy

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

DRY=0 CC='' NODE_ID='' ADVERTISE='' HYPERVISOR=libvirt TOKEN='' DEST=${DESTDIR:-} PKGS=1 START=1
BIN=${CANOPY_BIN:-}
while (($#)); do
    case $1 in
    --cc | --node-id | --advertise | --hypervisor | --join-token | --root)
        (($# >= 2)) || die "$1 needs a value"
        case $1 in
        --cc) CC=$2 ;;
        --node-id) NODE_ID=$2 ;;
        --advertise) ADVERTISE=$2 ;;
        --hypervisor) HYPERVISOR=$2 ;;
        --join-token) TOKEN=$2 ;;
        --root) DEST=$2 ;;
        esac
        shift 2
        ;;
    --cc=* | --node-id=* | --advertise=* | --hypervisor=* | --join-token=* | --root=*)
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
        ;;
    --dry-run) DRY=1; shift ;;
    --no-packages) PKGS=0; shift ;;
    --no-start) START=0; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) BIN=$1; shift ;;
    esac
done
BIN=${BIN:-$REPO/target/release/canopy}
DEST=${DEST%/}

# Values go into TOML strings and sed expressions: refuse what could break either.
URL_RE='^https?://[][A-Za-z0-9._~:@%+-]+(/[A-Za-z0-9._~%/+-]*)?$'
url_ok() { [[ $1 =~ $URL_RE ]]; }
[[ -z $CC ]] || url_ok "$CC" || die "--cc $CC: expected a URL like http://cc-1a.example:8775"
[[ -z $ADVERTISE ]] || url_ok "$ADVERTISE" ||
    die "--advertise $ADVERTISE: expected a URL like http://hv-01.example:8777"
[[ -z $NODE_ID || $NODE_ID =~ ^[A-Za-z0-9._-]{1,255}$ ]] ||
    die "--node-id $NODE_ID: letters, digits, '.', '_' and '-' only"
[[ $HYPERVISOR =~ ^(libvirt|auto|sim)$ ]] || die "--hypervisor $HYPERVISOR: libvirt, auto or sim"
[[ -z $TOKEN || $TOKEN =~ ^canopy1\.[0-9a-f]{64}\.[0-9a-f]{16}\.[0-9a-f]{48}$ ]] ||
    die "--join-token: not a Canopy join token (canopy1.<ca-sha256>.<id>.<secret>)"
if [[ -n $DEST ]]; then
    [[ $DEST == /* ]] || DEST=$PWD/$DEST
    [[ $DEST != / ]] || DEST=''
fi

# Runs a command, or says it would.
act() {
    if ((DRY)); then
        say "would run: $*"
    else
        "$@"
    fi
}

# Runs a long command with its output in a log, shown (the end of it) only when it fails.
quietly() {
    local what=$1 log=$SCRATCH/command.log
    shift
    if ((DRY)); then
        say "would run: $*"
        return
    fi
    say "$what"
    if ! "$@" >"$log" 2>&1; then
        tail -20 "$log" >&2
        die "$what failed (its last lines above): $*"
    fi
}

# Puts the contents of SRC at DEST$PATH with MODE, unless they are there already. Returns 0
# when it wrote (or would write), 1 when nothing changed.
put() {
    local src=$1 path=$2 mode=$3 target=$DEST$2
    if [[ -f $target ]] && cmp -s "$src" "$target"; then
        say "$path: unchanged"
        return 1
    fi
    if ((DRY)); then
        say "would write $target (mode $mode)"
        return 0
    fi
    mkdir -p "$(dirname "$target")"
    # A new file renamed into place: a running binary is replaced, not overwritten.
    install -m "$mode" "$src" "$target.canopy-new"
    mv -f "$target.canopy-new" "$target"
    say "$path: written"
}

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/canopy-node-install.XXXXXX")
POLICY_RC=''
cleanup() {
    [[ -z $POLICY_RC ]] || rm -f "$POLICY_RC"
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

if ((!DRY)) && [[ $(id -u) -ne 0 && -z $DEST ]]; then
    die "run it as root (or with --dry-run, or --root DIR to install into a directory)"
fi
if [[ -n $DEST && ! -d $DEST ]]; then
    act mkdir -p "$DEST"
fi
mode=''
((!DRY)) || mode=' (dry run: nothing changes)'
say "installing the Canopy node controller into ${DEST:-/}$mode"

# --- 1. packages ------------------------------------------------------------------------
installed() {
    [[ $(dpkg-query --admindir="$DEST/var/lib/dpkg" -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}
if ((!PKGS)); then
    say "packages: skipped (--no-packages)"
elif ! command -v dpkg-query >/dev/null || [[ ! -d $DEST/var/lib/dpkg ]]; then
    warn "packages: ${DEST:-this host} has no dpkg database (not Debian or Ubuntu): install ${PACKAGES[*]} or their equivalents yourself"
else
    missing=()
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    if ((${#missing[@]} == 0)); then
        say "packages: ${PACKAGES[*]} already installed"
    else
        in_root=()
        if [[ -n $DEST ]]; then
            if [[ ! -x $DEST/usr/bin/apt-get ]] || { ((!DRY)) && [[ $(id -u) -ne 0 ]]; }; then
                warn "packages: not installed into $DEST (it has no apt-get, or this is not root): ${missing[*]}"
                missing=()
            else
                in_root=(chroot "$DEST")
                # Package scripts must not start services in a chroot (the standard switch).
                if [[ ! -e $DEST/usr/sbin/policy-rc.d ]] && ((!DRY)); then
                    POLICY_RC=$DEST/usr/sbin/policy-rc.d
                    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
                    chmod 755 "$POLICY_RC"
                fi
            fi
        fi
        if ((${#missing[@]})); then
            say "packages: missing ${missing[*]}"
            apt=("${in_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y)
            # Without package lists (a fresh image), apt cannot find them: update first.
            if ! "${in_root[@]}" apt-cache show "${missing[@]}" >/dev/null 2>&1; then
                quietly "apt-get update" "${apt[@]}" update
            fi
            # No recommends: they would bring libvirt's other drivers and QEMU's GUI.
            quietly "apt-get install (a minute or two)" \
                "${apt[@]}" install --no-install-recommends "${missing[@]}"
            ((DRY)) || say "packages: installed ${missing[*]}"
        fi
    fi
fi

# --- 2. the binary --------------------------------------------------------------------------
[[ -f $BIN && -x $BIN ]] ||
    die "no canopy binary at $BIN: build it first (cargo build --release -p canopy --features libvirt) or give its path"
if ! version=$("$BIN" --version 2>&1); then
    warn "$BIN does not run here: $version"
    version="(not run)"
fi
# ldd's output read whole: `ldd | grep -q` under pipefail fails when ldd dies of SIGPIPE.
if [[ $HYPERVISOR != sim && $(ldd "$BIN" 2>/dev/null) != *libvirt.so* ]]; then
    warn "$BIN has no libvirt driver (built without --features libvirt): this node cannot run guests; rebuild it, or use --hypervisor sim"
fi
bin_changed=0
put "$BIN" "$BIN_PATH" 0755 && bin_changed=1
say "binary: $version"

# --- 3. the configuration --------------------------------------------------------------
config_value() { sed -nE "/^$1 *= *\"/{s/^$1 *= *\"(.*)\"/\1/p;q}" "$DEST$CONFIG"; }
fresh_default=0
if [[ -f $DEST$CONFIG ]]; then
    say "$CONFIG: exists, kept as it is"
    for kv in "cc=$CC" "node_id=$NODE_ID" "advertise=$ADVERTISE" "hypervisor=$HYPERVISOR"; do
        key=${kv%%=*} want=${kv#*=}
        [[ $key == hypervisor && $HYPERVISOR == libvirt ]] && continue # the default
        have=$(config_value "$key")
        if [[ -n $want && $want != "$have" ]]; then
            if [[ -n $have ]]; then have="$key = \"$have\""; else have="no $key"; fi
            warn "$CONFIG has $have, not \"$want\": edit it to change it"
        fi
    done
else
    [[ -f $TEMPLATE ]] || die "$TEMPLATE is missing: run install.sh from a Canopy checkout"
    rendered=$SCRATCH/nc.toml
    edits=(-e "s|^hypervisor = .*|hypervisor = \"$HYPERVISOR\"|")
    [[ -z $NODE_ID ]] || edits+=(-e "s|^# node_id = .*|node_id = \"$NODE_ID\"|")
    [[ -z $CC ]] || edits+=(-e "s|^cc = .*|cc = \"$CC\"|")
    [[ -z $TOKEN ]] || edits+=(-e "s|^# join_token = .*|join_token = \"$TOKEN\"|")
    if [[ -n $ADVERTISE ]]; then
        port=8777
        [[ $ADVERTISE =~ ^[a-z]+://[^/]*:([0-9]+)(/|$) ]] && port=${BASH_REMATCH[1]}
        edits+=(-e "s|^listen = .*|listen = \"0.0.0.0:$port\"|"
            -e "s|^# advertise = .*|advertise = \"$ADVERTISE\"|")
    fi
    {
        printf '# Written by deploy/node/install.sh on %s; install.sh never overwrites it.\n' "$(date -u +%F)"
        printf '# After editing: canopy nc doctor --config %s && systemctl restart canopy-nc\n' "$CONFIG"
        sed "${edits[@]}" "$TEMPLATE"
    } >"$rendered"
    # The template's lines this relies on: fail loudly when they change.
    for want in "hypervisor = \"$HYPERVISOR\"" ${NODE_ID:+"node_id = \"$NODE_ID\""} \
        ${CC:+"cc = \"$CC\""} ${ADVERTISE:+"advertise = \"$ADVERTISE\""} \
        ${TOKEN:+"join_token = \"$TOKEN\""}; do
        grep -qxF "$want" "$rendered" || die "$TEMPLATE changed: install.sh could not set '$want'"
    done
    # A join token is a secret until it is spent: root only, then.
    put "$rendered" "$CONFIG" "$([[ -n $TOKEN ]] && echo 0600 || echo 0644)" || true
    say "$CONFIG: $(grep -E '^(node_id|listen|advertise|cc|hypervisor) =' "$rendered" | paste -sd ',' | sed 's/,/, /g')"
    if [[ -z $CC ]]; then
        fresh_default=1
        warn "$CONFIG names the CC http://127.0.0.1:8775 (no --cc): set cc before starting the node"
    fi
fi
# The TLS directory: the node's key lives here.
tls_dir=$(config_value tls_dir 2>/dev/null || true)
tls_dir=${tls_dir:-/etc/canopy/tls}
if [[ -d $DEST$tls_dir ]]; then
    say "$tls_dir: exists$([[ -f $DEST$tls_dir/tls.crt ]] && echo ', holds the node'"'"'s certificate')"
else
    act mkdir -p -m 0700 "$DEST$tls_dir"
    ((DRY)) || say "$tls_dir: created (the node fills it when it joins)"
fi
state_dir=$(config_value state_dir 2>/dev/null || true)
state_dir=${state_dir:-/var/lib/canopy/nc}
[[ -f $DEST$CONFIG ]] || state_dir=/var/lib/canopy/nc # a dry run on a fresh root
if [[ -d $DEST$state_dir ]]; then
    say "$state_dir: exists"
else
    # 0755 all the way: QEMU runs as its own user and must reach the instances' files.
    act mkdir -p -m 0755 "$DEST$state_dir"
    ((DRY)) || say "$state_dir: created"
fi

# --- 4. the systemd unit ----------------------------------------------------------------
cat >"$SCRATCH/$UNIT_NAME" <<EOF
# Written by deploy/node/install.sh; running it again rewrites this file.
# Settings go in $CONFIG, not here.
[Unit]
Description=Canopy node controller
After=network-online.target libvirtd.service
Wants=network-online.target libvirtd.service

[Service]
Type=simple
ExecStart=$BIN_PATH nc --config $CONFIG
Restart=on-failure
RestartSec=5
Environment=CANOPY_LOG=info
# Guests are libvirtd's processes, not this service's: stopping or restarting the node
# controller leaves them running, and it adopts them again when it starts.

# Hardening. It runs as root: it reaches libvirtd's system socket, owns the state directory
# and may serve the metadata service on port 80. Not set, on purpose: PrivateDevices (the
# accelerator probe opens /dev/kvm), MemoryDenyWriteExecute and SystemCallFilter (that probe
# runs QEMU, whose software emulation writes and runs code), ProtectSystem=strict (state_dir
# may be anywhere in /var or /srv).
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER

[Install]
WantedBy=multi-user.target
EOF
unit_changed=0
put "$SCRATCH/$UNIT_NAME" "/etc/systemd/system/$UNIT_NAME" 0644 && unit_changed=1

# --- 5. services ------------------------------------------------------------------------
if [[ -n $DEST ]]; then
    say "services: not started (installing into $DEST)"
elif ((!START)); then
    say "services: not enabled or started (--no-start)"
elif [[ ! -d /run/systemd/system ]]; then
    say "services: systemd is not running here, nothing enabled or started; run the node with:"
    say "  $BIN_PATH nc --config $CONFIG"
else
    act systemctl daemon-reload
    act systemctl enable --now libvirtd.service
    act systemctl enable "$UNIT_NAME"
    if ((fresh_default)); then
        say "services: $UNIT_NAME enabled, not started: set cc in $CONFIG, then systemctl start canopy-nc"
    elif systemctl is-active --quiet "$UNIT_NAME"; then
        if ((bin_changed || unit_changed)); then
            act systemctl restart "$UNIT_NAME"
        else
            say "services: $UNIT_NAME running, unchanged"
        fi
    else
        act systemctl start "$UNIT_NAME"
    fi
fi

say "done. Check the host:  ${DEST:+chroot $DEST }canopy nc doctor --config $CONFIG"
[[ -n $DEST ]] || say "logs:  journalctl -u canopy-nc -f"
