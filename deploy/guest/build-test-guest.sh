#!/usr/bin/env bash
# Builds Canopy's test guest from Debian packages, with no root and no container:
#
#   deploy/guest/build-test-guest.sh [OUT_DIR]      (default: target/test-guest)
#
# OUT_DIR/vmlinuz      the kernel of linux-image-cloud-amd64 (registered as an EKI)
# OUT_DIR/initrd.gz    a busybox-static initramfs (registered as an ERI) whose init prints
#                      "canopy-test-guest: instance <id> is up" on the console, <id> taken
#                      from the kernel command line's canopy.instance_id=, then keeps
#                      running until an ACPI power-off (the power button), when it powers
#                      the machine off
# OUT_DIR/disk.qcow2   an empty 64 MiB disk (the EMI the two boot with)
# OUT_DIR/VERSION      the package versions it was built from, and the init's revision
#
# It needs apt-get (Debian's package lists: run `apt-get update` once as root if they are
# missing), dpkg-deb, gzip and qemu-img. An OUT_DIR that already holds a build is kept;
# pass --force to rebuild.
set -euo pipefail

force=0
if [[ ${1:-} == --force ]]; then force=1; shift; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-$ROOT/target/test-guest}

# Raised whenever the initramfs's init changes, so that a build made by an earlier one is
# made again rather than kept.
INIT_REVISION=2

die() { printf 'build-test-guest: %s\n' "$*" >&2; exit 1; }

if [[ $force == 0 && -s $OUT/vmlinuz && -s $OUT/initrd.gz && -s $OUT/disk.qcow2 && -s $OUT/VERSION ]] &&
    grep -qx "init revision $INIT_REVISION" "$OUT/VERSION"; then
    echo "build-test-guest: $OUT already holds $(tr '\n' ' ' <"$OUT/VERSION")"
    exit 0
fi
for tool in apt-get apt-cache dpkg-deb gzip qemu-img; do
    command -v "$tool" >/dev/null || die "$tool is missing (Debian: apt-get install apt dpkg gzip qemu-utils)"
done

# The metapackage names the current kernel package; download that one.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[[ -n $kernel_pkg ]] || die "apt does not know linux-image-cloud-amd64: run 'apt-get update' (as root) first"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download writes into the current directory; as root it warns that the _apt user
# cannot write here, which is harmless.
apt-get download -q "$kernel_pkg" busybox-static 2> >(grep -v 'unsandboxed' >&2) >/dev/null ||
    die "apt-get download $kernel_pkg busybox-static failed"
dpkg-deb -x "$kernel_pkg"_*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
release=$(ls kernel/lib/modules)
[[ -f kernel/boot/vmlinuz-$release ]] || die "no kernel image in $kernel_pkg"

# The initramfs: busybox, the two modules an ACPI power button needs (they are modules in
# the cloud kernel), and the init.
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp busybox/bin/busybox "$root/bin/busybox"
for m in drivers/input/evdev.ko drivers/acpi/button.ko; do
    src=kernel/lib/modules/$release/kernel/$m
    [[ -f $src ]] || die "$m is not in $kernel_pkg"
    cp "$src" "$root/lib/modules/"
done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
id=$(sed -n 's/.*canopy\.instance_id=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "canopy-test-guest: instance ${id:-unknown} is up"
# An ACPI power-off arrives as a key press on a "Power Button" input device (the button
# module registers it, perhaps a moment after insmod): the first event read from one powers
# the machine off. The device delivers only to readers that have it open, so the guest says
# it waits once the device is open: a press after that line is never lost (one sent before
# the reader opened it was, and the test host's reboot then waited for nothing).
watching=0
tries=0
while [ $watching = 0 ] && [ $tries -lt 50 ]; do
    for ev in /sys/class/input/event*; do
        [ -e "$ev/device/name" ] && grep -q "Power Button" "$ev/device/name" || continue
        node=/dev/input/${ev##*/}
        ( while [ ! -e "$node" ]; do sleep 0.1; done
          exec 3<"$node"
          echo "canopy-test-guest: instance ${id:-unknown} waits for an ACPI power-off"
          dd bs=24 count=1 <&3 >/dev/null 2>&1 &&
              echo "canopy-test-guest: instance ${id:-unknown} powering off" &&
              poweroff -f ) &
        watching=1
    done
    tries=$((tries + 1))
    [ $watching = 1 ] || sleep 0.1
done
[ $watching = 1 ] ||
    echo "canopy-test-guest: no power button found; ACPI power-off will not work"
while :; do sleep 3600; done
INIT
chmod 755 "$root/init"

mkdir -p "$OUT"
(cd "$root" && find . | LC_ALL=C sort | "$work/busybox/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -9 >"$OUT/initrd.gz.tmp"
cp "kernel/boot/vmlinuz-$release" "$OUT/vmlinuz.tmp"
rm -f "$OUT/disk.qcow2"
qemu-img create -q -f qcow2 "$OUT/disk.qcow2" 64M
mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
{ dpkg-deb -W --showformat='${Package} ${Version}\n' "$kernel_pkg"_*.deb busybox-static_*.deb
  echo "init revision $INIT_REVISION"; } >"$OUT/VERSION"
echo "build-test-guest: built $OUT from $(tr '\n' ' ' <"$OUT/VERSION")"
