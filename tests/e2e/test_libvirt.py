"""Real guests (issue 4): `canopy clc`, `canopy cc` and `canopy nc --hypervisor libvirt` as
separate processes, libvirtd with QEMU under them, the test guest
(deploy/guest/build-test-guest.sh) registered through EC2 RegisterImage, and the AWS CLI and
boto3 driving its whole life: boot line in the console, stop (domain shut off), start (boots
again), reboot, a guest killed behind Canopy's back, an NC killed and restarted (its guests
neither restarted nor lost), terminate (no domain, no disk left); and CreateImage of a
stopped guest, whose image boots a second guest with the first one's bytes.

Software emulation (`--accelerator qemu`) keeps the run the same on every host. Skipped
without libvirtd or a libvirt-enabled canopy, except under CI (CI=true), where .ci/run
provides both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import find_binary, free_port, parse_canopyrc
from ha_cluster import OneReplicaCloud, Proc
from test_roles import ec2_client, wait_node, wait_zone

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "target" / "test-guest"
WAIT = {"Delay": 1, "MaxAttempts": 120}
BOOT_TIMEOUT = 120.0
ZONE = "real-1a"
NODE = "hv-real"


def skip_or_fail(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} under CI (.ci/run provides it)")
    pytest.skip(why)


def virsh(*args: str) -> str:
    out = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() if out.returncode == 0 else ""


@pytest.fixture
def real(tmp_path_factory):
    """A CLC, a CC and a libvirt NC, torn down (with the guests it launched) before the
    next test: leftover domains would hold the host's memory for the next cloud."""
    if not Path("/run/libvirt/libvirt-sock").exists():
        skip_or_fail("libvirtd is not running")
    binary = str(find_binary())
    subprocess.run([str(REPO / "deploy" / "guest" / "build-test-guest.sh"), str(GUEST_DIR)], check=True,
                   timeout=600)
    tmp = tmp_path_factory.mktemp("real")
    # QEMU runs as libvirt's own user: the node's files must be where it can reach them
    # (pytest's temporary directories are private to this user).
    state = Path(tempfile.mkdtemp(prefix="e2e-libvirt-", dir=REPO / "target"))
    state.chmod(0o755)
    cloud = OneReplicaCloud(binary, tmp, ZONE, NODE, stop_timeout=20,
                            nc_args=["--hypervisor", "libvirt", "--accelerator", "qemu",
                                     "--state-dir", str(state), "--disk-gib", "20"])
    clc, cc, nc = cloud.procs()
    data = cloud.data
    for p in (clc, cc, nc):
        p.start()
    rc_path = data / "canopyrc"
    launched: list[str] = []
    try:
        ec2 = ec2_client(rc_path)
        wait_zone(ec2, ZONE)
        deadline = time.time() + 60
        while not nc.log() or "node controller ready" not in nc.log():
            if not nc.running:
                log = nc.log()
                if "without the libvirt driver" in log:
                    skip_or_fail("this canopy was built without the libvirt driver")
                pytest.fail(f"canopy nc exited:\n{log}")
            assert time.time() < deadline, f"canopy nc did not start:\n{nc.log()}"
            time.sleep(0.2)
        wait_node(rc_path, NODE)
        yield {"ec2": ec2, "rc": parse_canopyrc(rc_path.read_text()), "nc": nc, "state": state,
               "tmp": tmp, "procs": (clc, cc, nc), "launched": launched}
    finally:
        for p in (nc, cc, clc):
            p.stop()
        # A failed run must not leave guests behind for the next one.
        for iid in launched:
            virsh("destroy", iid)
            virsh("undefine", iid)
        shutil.rmtree(state, ignore_errors=True)
        print("\n".join(f"----- {p.name} log (tail) -----\n{p.log_tail(60)}" for p in (clc, cc, nc)))


def aws(real, *args: str):
    """The AWS CLI (v1, this interpreter's) with the cloud's credentials; JSON in, JSON out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CANOPY_"))}
    env.update(real["rc"])
    proc = subprocess.run([sys.executable, "-m", "awscli", *args, "--output", "json"], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"aws {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def console(real, iid: str) -> str:
    return aws(real, "ec2", "get-console-output", "--instance-id", iid).get("Output", "") or ""


def boots(real, iid: str) -> int:
    return console(real, iid).count(f"canopy-test-guest: instance {iid} is up")


def wait_boots(real, iid: str, n: int) -> None:
    deadline = time.time() + BOOT_TIMEOUT
    while boots(real, iid) < n:
        assert time.time() < deadline, f"{iid} did not boot {n} time(s):\n{console(real, iid)[-2000:]}"
        time.sleep(1)


def instance(ec2, iid: str) -> dict:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def error_code(exc) -> str:
    return exc.response["Error"]["Code"]


def register(ec2, name: str, path: Path, **extra) -> str:
    return ec2.register_image(Name=name, ImageLocation=str(path), **extra)["ImageId"]


def test_registered_images_boot_real_guests_through_their_whole_life(real):
    ec2 = real["ec2"]
    # The node says how it runs guests: QEMU, and why not KVM.
    req = urllib.request.Request(real["rc"]["CANOPY_ADMIN_ENDPOINT"] + "/v1/nodes",
                                 headers={"Authorization": "Bearer " + real["rc"]["CANOPY_ADMIN_TOKEN"]})
    with urllib.request.urlopen(req, timeout=10) as resp:
        (node,) = [n for n in json.load(resp) if n["node_id"] == NODE]
    assert node["hypervisor"] == "qemu"
    assert "software emulation" in node["hypervisor_detail"], node
    # Kernel and ramdisk are told apart by their bytes; the machine image names them.
    eki = register(ec2, "guest-kernel", GUEST_DIR / "vmlinuz")
    eri = register(ec2, "guest-ramdisk", GUEST_DIR / "initrd.gz")
    emi = register(ec2, "guest-disk", GUEST_DIR / "disk.qcow2", KernelId=eki, RamdiskId=eri,
                   Description="the test guest")
    assert eki.startswith("eki-") and eri.startswith("eri-") and emi.startswith("ami-")
    images = {i["ImageId"]: i for i in ec2.describe_images(Owners=["self"])["Images"]}
    assert images[eki]["ImageType"] == "kernel"
    assert images[eri]["ImageType"] == "ramdisk"
    assert images[emi]["ImageType"] == "machine"
    assert (images[emi]["KernelId"], images[emi]["RamdiskId"]) == (eki, eri)
    assert all(images[i]["State"] == "available" for i in (eki, eri, emi))

    # Bad registrations and launches are refused in EC2's terms, and register nothing.
    with pytest.raises(ec2.exceptions.ClientError) as e:
        register(ec2, "missing-file", real["tmp"] / "no-such-file")
    assert error_code(e.value) == "InvalidParameterValue"
    with pytest.raises(ec2.exceptions.ClientError) as e:
        register(ec2, "wrong-kernel", GUEST_DIR / "disk.qcow2", KernelId=eri)
    assert error_code(e.value) == "InvalidParameterValue"
    with pytest.raises(ec2.exceptions.ClientError) as e:
        register(ec2, "guest-disk", GUEST_DIR / "disk.qcow2")
    assert error_code(e.value) == "InvalidAMIName.Duplicate"
    with pytest.raises(ec2.exceptions.ClientError) as e:
        ec2.run_instances(ImageId=eki, MinCount=1, MaxCount=1)
    assert error_code(e.value) == "InvalidParameterValue"
    names = {i["Name"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    assert not names & {"missing-file", "wrong-kernel"}, names

    # Two real guests, launched with the AWS CLI.
    out = aws(real, "ec2", "run-instances", "--image-id", emi, "--instance-type", "t2.micro", "--count", "2")
    a, b = (i["InstanceId"] for i in out["Instances"])
    real["launched"].extend([a, b])
    assert out["Instances"][0]["KernelId"] == eki
    ec2.get_waiter("instance_running").wait(InstanceIds=[a, b], WaiterConfig=WAIT)
    for iid in (a, b):
        wait_boots(real, iid, 1)
        assert virsh("domstate", iid) == "running"

    # Stop: the domain is shut off (ACPI power button: the guest powers itself off).
    ec2.stop_instances(InstanceIds=[a])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[a], WaiterConfig=WAIT)
    assert virsh("domstate", a) == "shut off"
    assert "waits for an ACPI power-off" in console(real, a)
    # Start: the same domain boots again.
    ec2.start_instances(InstanceIds=[a])
    ec2.get_waiter("instance_running").wait(InstanceIds=[a], WaiterConfig=WAIT)
    wait_boots(real, a, 2)
    # Reboot: boots again and stays running.
    ec2.reboot_instances(InstanceIds=[b])
    wait_boots(real, b, 2)
    assert instance(ec2, b)["State"]["Name"] == "running"

    # A volume: attached to the running guest as a virtio disk (its qcow2 file made on the
    # node), `attached` once libvirt has it; detached (the guest lets go); deleted, and the
    # node removes its bytes.
    zone = instance(ec2, b)["Placement"]["AvailabilityZone"]
    vid = ec2.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"]
    ec2.attach_volume(VolumeId=vid, InstanceId=b, Device="/dev/sdf")
    deadline = time.time() + 60
    while ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"][0]["State"] != "attached":
        assert time.time() < deadline, "the volume did not become attached"
        time.sleep(0.5)
    vfile = real["state"] / "volumes" / f"{vid}.qcow2"
    assert vfile.exists()
    assert "vdf" in virsh("domblklist", b) and str(vfile) in virsh("domblklist", b)
    ec2.detach_volume(VolumeId=vid)
    ec2.get_waiter("volume_available").wait(VolumeIds=[vid], WaiterConfig=WAIT)
    assert str(vfile) not in virsh("domblklist", b)
    ec2.delete_volume(VolumeId=vid)
    deadline = time.time() + 60
    while vfile.exists():
        assert time.time() < deadline, "the deleted volume's file is still on the node"
        time.sleep(0.5)

    # Kill the node controller outright while the guests run, and restart it: they are
    # re-adopted, neither restarted (same QEMU processes, no new boot) nor lost.
    domids = {iid: virsh("domid", iid) for iid in (a, b)}
    assert all(domids.values()), domids
    real["nc"].kill()
    time.sleep(2)
    real["nc"].start()
    deadline = time.time() + 60
    while real["nc"].log().count("registered with the cluster controller") < 2:
        assert time.time() < deadline, f"the restarted NC did not register:\n{real['nc'].log_tail(30)}"
        time.sleep(0.2)
    time.sleep(3)
    assert {iid: virsh("domid", iid) for iid in (a, b)} == domids
    assert (boots(real, a), boots(real, b)) == (2, 2)
    assert {instance(ec2, i)["State"]["Name"] for i in (a, b)} == {"running"}
    # And the restarted node still drives them.
    ec2.stop_instances(InstanceIds=[b])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[b], WaiterConfig=WAIT)
    assert virsh("domstate", b) == "shut off"

    # A guest whose QEMU dies (killed here) is reported stopped with a server error, not
    # restarted behind the user's back nor lost; starting it boots it again.
    pid = int(Path(f"/run/libvirt/qemu/{a}.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while instance(ec2, a)["State"]["Name"] != "stopped":
        assert time.time() < deadline, f"the killed guest is still {instance(ec2, a)['State']}"
        time.sleep(0.5)
    reason = instance(ec2, a).get("StateReason", {})
    assert reason.get("Code") == "Server.InternalError", reason
    ec2.start_instances(InstanceIds=[a])
    ec2.get_waiter("instance_running").wait(InstanceIds=[a], WaiterConfig=WAIT)
    wait_boots(real, a, 3)

    # Deregistering the image stops new launches, not the instances made from it.
    ec2.deregister_image(ImageId=emi)
    with pytest.raises(ec2.exceptions.ClientError) as e:
        ec2.run_instances(ImageId=emi, MinCount=1, MaxCount=1)
    assert error_code(e.value) == "InvalidAMIID.Unavailable"
    assert emi not in {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    ec2.start_instances(InstanceIds=[b])
    ec2.get_waiter("instance_running").wait(InstanceIds=[b], WaiterConfig=WAIT)
    wait_boots(real, b, 3)

    # Terminate: no domain, no instance files left.
    aws(real, "ec2", "terminate-instances", "--instance-ids", a, b)
    ec2.get_waiter("instance_terminated").wait(InstanceIds=[a, b], WaiterConfig=WAIT)
    names = virsh("list", "--all", "--name").split()
    assert a not in names and b not in names
    for iid in (a, b):
        assert not (real["state"] / "instances" / iid).exists()


def qemu_io(path: Path, command: str) -> None:
    """qemu-io on a qcow2 file; reads share a file a QEMU may hold (`-r -U`)."""
    share = ["-r", "-U"] if command.startswith("read") else ["-n"]
    out = subprocess.run(["qemu-io", *share, "-f", "qcow2", "-c", command, str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "fail" not in out.stdout, f"{command}: {out.stdout}{out.stderr}"


def test_an_image_of_a_stopped_guest_boots_with_its_disk(real):
    """CreateImage on a real node: the stopped guest's root overlay and the machine image
    under it are flattened by qemu-img on the node, uploaded through the CC into the CLC's
    image store, and a guest launched from the new image boots with the first one's bytes
    on its root disk."""
    ec2 = real["ec2"]
    eki = register(ec2, "img-kernel", GUEST_DIR / "vmlinuz")
    eri = register(ec2, "img-ramdisk", GUEST_DIR / "initrd.gz")
    emi = register(ec2, "img-disk", GUEST_DIR / "disk.qcow2", KernelId=eki, RamdiskId=eri)
    a = ec2.run_instances(ImageId=emi, InstanceType="t2.micro", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    real["launched"].append(a)
    ec2.get_waiter("instance_running").wait(InstanceIds=[a], WaiterConfig=WAIT)
    wait_boots(real, a, 1)
    with pytest.raises(ec2.exceptions.ClientError) as e:
        ec2.create_image(InstanceId=a, Name="while-running")
    assert error_code(e.value) == "IncorrectInstanceState"
    ec2.stop_instances(InstanceIds=[a])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[a], WaiterConfig=WAIT)
    # What the guest's filesystem would have written before it stopped.
    qemu_io(real["state"] / "instances" / a / "root.qcow2", "write -P 0xcd 2M 64k")

    ami = aws(real, "ec2", "create-image", "--instance-id", a, "--name", "from-a")["ImageId"]
    (img,) = ec2.describe_images(ImageIds=[ami])["Images"]
    assert img["State"] in ("pending", "available"), img
    ec2.get_waiter("image_available").wait(ImageIds=[ami], WaiterConfig=WAIT)
    (img,) = ec2.describe_images(ImageIds=[ami])["Images"]
    assert (img["State"], img["KernelId"], img["RamdiskId"], img["RootDeviceType"]) == ("available", eki, eri, "ebs")
    sid = img["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    (snap,) = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"]
    assert snap["State"] == "completed" and snap["FullSnapshotSizeInBytes"] > 0

    b = aws(real, "ec2", "run-instances", "--image-id", ami, "--instance-type", "t2.micro",
            "--count", "1")["Instances"][0]["InstanceId"]
    real["launched"].append(b)
    ec2.get_waiter("instance_running").wait(InstanceIds=[b], WaiterConfig=WAIT)
    wait_boots(real, b, 1)
    assert instance(ec2, b)["KernelId"] == eki
    # Its root disk (an overlay on the new image's bytes) starts with what a had written.
    qemu_io(real["state"] / "instances" / b / "root.qcow2", "read -P 0xcd 2M 64k")

    # The source goes; the instance made from its image runs on.
    ec2.terminate_instances(InstanceIds=[a])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=[a], WaiterConfig=WAIT)
    assert virsh("domstate", b) == "running"
    ec2.terminate_instances(InstanceIds=[b])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=[b], WaiterConfig=WAIT)
    ec2.deregister_image(ImageId=ami)
    ec2.delete_snapshot(SnapshotId=sid)


def test_the_all_in_one_cloud_with_libvirt_boots_its_test_guest():
    """What the README promises a new user: `canopy dev --hypervisor libvirt`, then
    run-instances of the test guest it registered, and its boot line in the console."""
    if not Path("/run/libvirt/libvirt-sock").exists():
        skip_or_fail("libvirtd is not running")
    binary = str(find_binary())
    data = Path(tempfile.mkdtemp(prefix="e2e-dev-libvirt-", dir=REPO / "target"))
    data.chmod(0o755)
    ec2_port, admin_port = free_port(), free_port()
    dev = Proc("dev", [binary, "dev", "--data-dir", str(data), "--hypervisor", "libvirt", "--accelerator", "qemu",
                       "--ec2-listen", f"127.0.0.1:{ec2_port}", "--admin-listen", f"127.0.0.1:{admin_port}"],
               data.parent, stop_timeout=30)
    dev.log_path = data.parent / f"{data.name}.log"
    dev.start()
    launched: list[str] = []
    try:
        deadline = time.time() + 600  # the first start builds the test guest
        while not (data / "canopyrc").exists():
            if not dev.running:
                if "without the libvirt driver" in dev.log():
                    skip_or_fail("this canopy was built without the libvirt driver")
                pytest.fail(f"canopy dev exited:\n{dev.log()}")
            assert time.time() < deadline, f"canopy dev did not come up:\n{dev.log_tail(40)}"
            time.sleep(0.5)
        real = {"rc": parse_canopyrc((data / "canopyrc").read_text())}
        images = aws(real, "ec2", "describe-images", "--filters", "Name=name,Values=canopy-test-guest")["Images"]
        assert len(images) == 1, images
        assert images[0]["KernelId"].startswith("eki-") and images[0]["RamdiskId"].startswith("eri-")
        out = aws(real, "ec2", "run-instances", "--image-id", images[0]["ImageId"], "--instance-type", "t2.micro",
                  "--count", "1")
        iid = out["Instances"][0]["InstanceId"]
        launched.append(iid)
        wait_boots(real, iid, 1)
        aws(real, "ec2", "terminate-instances", "--instance-ids", iid)
        deadline = time.time() + 60
        while iid in virsh("list", "--all", "--name").split():
            assert time.time() < deadline, "the terminated guest's domain is still defined"
            time.sleep(0.5)
    finally:
        dev.stop()
        for iid in launched:
            virsh("destroy", iid)
            virsh("undefine", iid)
        if dev.log_path.exists():
            print(f"----- dev log (tail) -----\n{dev.log_tail(40)}")
        shutil.rmtree(data, ignore_errors=True)
