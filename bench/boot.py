#!/usr/bin/env python3
"""Boot latency of a real guest: Canopy's RunInstances → the guest's boot line in
GetConsoleOutput, against the hypervisor floor, `virsh create` of an equivalent hand-written
domain → the same line in its console log. Same guest (deploy/guest/build-test-guest.sh), same
accelerator, same size (1 vCPU, 1 GiB, kernel + initrd + a qcow2 overlay), both polled every
POLL seconds. Not a test: it prints numbers and asserts nothing.

    .venv/bin/python bench/boot.py [--runs 7] [--binary PATH] [--accelerator qemu|kvm]

Needs libvirtd (qemu:///system) and a canopy built with `--features libvirt`
(target/release/canopy if built, else target/debug/canopy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "target" / "test-guest"
POLL = 0.05
TIMEOUT = 120.0
URI = "qemu:///system"
# The port picker is the end-to-end tests' (it never hands out a port twice).
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from conftest import free_port  # noqa: E402


def virsh(*args: str, check: bool = True) -> str:
    out = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def floor_domain(name: str, work: Path, accel: str) -> tuple[str, Path]:
    """A domain written by hand the way an operator would for this guest."""
    disk = work / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(GUEST / "disk.qcow2"),
                    str(disk), "1G"], check=True)
    log = work / f"{name}.log"
    domain_type = "kvm" if accel == "kvm" else "qemu"
    xml = f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{GUEST / 'vmlinuz'}</kernel>
    <initrd>{GUEST / 'initrd.gz'}</initrd>
    <cmdline>console=ttyS0 canopy.instance_id={name}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>
      <log file='{log}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
"""
    path = work / f"{name}.xml"
    path.write_text(xml)
    return str(path), log


def floor_run(work: Path, accel: str) -> float:
    name = "i-" + uuid.uuid4().hex[:17]
    xml, log = floor_domain(name, work, accel)
    line = f"canopy-test-guest: instance {name} is up"
    t0 = time.monotonic()
    virsh("create", xml)
    try:
        while True:
            if log.exists() and line in log.read_text(errors="replace"):
                return time.monotonic() - t0
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"{name} did not boot")
            time.sleep(POLL)
    finally:
        virsh("destroy", name, check=False)


def canopy_runs(binary: Path, runs: int, accel: str, work: Path) -> tuple[float, list[float]]:
    data = work / "dev"
    ec2_port, admin_port = free_port(), free_port()
    log = open(work / "dev.log", "wb")
    proc = subprocess.Popen([str(binary), "dev", "--data-dir", str(data), "--hypervisor", "libvirt",
                             "--accelerator", accel, "--ec2-listen", f"127.0.0.1:{ec2_port}",
                             "--admin-listen", f"127.0.0.1:{admin_port}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith(("CANOPY_", "AWS_"))})
    try:
        deadline = time.monotonic() + 600
        while not (data / "canopyrc").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"canopy dev did not come up: see {work / 'dev.log'}")
            time.sleep(0.2)
        rc = {}
        for line in (data / "canopyrc").read_text().splitlines():
            if line.startswith("export "):
                k, _, v = line[7:].partition("=")
                rc[k] = v.strip("'\"")
        ec2 = boto3.client("ec2", endpoint_url=rc["AWS_ENDPOINT_URL_EC2"], region_name=rc["AWS_DEFAULT_REGION"],
                           aws_access_key_id=rc["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=rc["AWS_SECRET_ACCESS_KEY"],
                           config=Config(retries={"max_attempts": 1}))
        image = ec2.describe_images(Filters=[{"Name": "name", "Values": ["canopy-test-guest"]}])["Images"][0]
        times = []
        for _ in range(runs + 1):  # the first launch also fills the node's image cache
            t0 = time.monotonic()
            iid = ec2.run_instances(ImageId=image["ImageId"], InstanceType="t2.micro", MinCount=1,
                                    MaxCount=1)["Instances"][0]["InstanceId"]
            line = f"canopy-test-guest: instance {iid} is up"
            while True:
                out = ec2.get_console_output(InstanceId=iid).get("Output") or ""
                if line in out:
                    times.append(time.monotonic() - t0)
                    break
                if time.monotonic() - t0 > TIMEOUT:
                    raise RuntimeError(f"{iid} did not boot")
                time.sleep(POLL)
            ec2.terminate_instances(InstanceIds=[iid])
            ec2.get_waiter("instance_terminated").wait(InstanceIds=[iid],
                                                       WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        return times[0], times[1:]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--binary", type=Path)
    ap.add_argument("--accelerator", default="qemu", choices=["qemu", "kvm"])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    binary = args.binary or next((p for p in (REPO / "target/release/canopy", REPO / "target/debug/canopy")
                                  if p.exists()), None)
    if binary is None:
        sys.exit("no canopy binary: cargo build --release -p canopy --features libvirt")
    subprocess.run([str(REPO / "deploy/guest/build-test-guest.sh"), str(GUEST)], check=True)
    # Under target/: QEMU runs as libvirt's user and must reach the files.
    work = Path(tempfile.mkdtemp(prefix="bench-boot-", dir=REPO / "target"))
    work.chmod(0o755)
    try:
        floor_domain_warm = floor_run(work, args.accelerator)  # warms libvirt's caches
        floor = [floor_run(work, args.accelerator) for _ in range(args.runs)]
        cold, canopy = canopy_runs(binary, args.runs, args.accelerator, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    f, c = statistics.median(floor), statistics.median(canopy)
    print(f"binary: {binary}  accelerator: {args.accelerator}  runs: {args.runs}  poll: {POLL * 1000:.0f} ms")
    print(f"floor  (virsh create -> boot line):        median {f:.3f} s  min {min(floor):.3f}  max {max(floor):.3f}"
          f"  (first, not counted: {floor_domain_warm:.3f})")
    print(f"canopy (RunInstances -> GetConsoleOutput): median {c:.3f} s  min {min(canopy):.3f}  max {max(canopy):.3f}"
          f"  (first, image cache cold, not counted: {cold:.3f})")
    print(f"overhead: {c - f:+.3f} s ({(c / f - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
