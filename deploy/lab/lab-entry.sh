#!/bin/sh
# The lab image's entrypoint: runs `canopy ARGS`. In a node container of a libvirt lab
# (CANOPY_LAB_LIBVIRTD=1: deploy/lab/docker-compose.libvirt.yml) it first starts virtlogd
# and libvirtd, set up for an unprivileged container: QEMU runs as root, without cgroup
# controllers (the container's cgroup is not libvirt's to divide), per-domain mount
# namespaces or a security driver (none of which a container without CAP_SYS_ADMIN has).
set -eu
if [ "${CANOPY_LAB_LIBVIRTD:-0}" = 1 ]; then
    conf=/etc/libvirt/qemu.conf
    grep -q '^# canopy-lab' "$conf" 2>/dev/null || cat >>"$conf" <<'CONF'
# canopy-lab
user = "root"
group = "root"
cgroup_controllers = [ ]
security_driver = "none"
namespaces = [ ]
remember_owner = 0
CONF
    mkdir -p /run/libvirt /var/lib/canopy/nc
    virtlogd -d
    libvirtd -d
    i=0
    while [ ! -S /run/libvirt/libvirt-sock ]; do
        i=$((i + 1))
        [ "$i" -le 100 ] || { echo "lab-entry: libvirtd did not start" >&2; exit 1; }
        sleep 0.1
    done
fi
exec /usr/local/bin/canopy "$@"
