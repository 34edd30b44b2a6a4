"""CreateImage with boto3 (its image_available waiter) and the AWS CLI: an image of a stopped
instance is pending until the instance's node has flattened the root disk and uploaded it
through the snapshot path (NC -> CC -> CLC image store), then available, with the snapshot
of the root in its block device mapping as an EBS-backed AMI has; describe filters, tags,
DryRun, EC2's errors, deregistration, launches from the new image, and a start or a
terminate of the source while the image is pending. The shared cloud's nodes are simulated
(a root disk's copy is a small real byte stream naming the instance); real disks are
flattened and booted in test_libvirt.py."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import expect_error

ZONE = "canopy-1a"
AMI_RE = re.compile(r"^ami-[0-9a-f]{17}$")


@pytest.fixture
def made(cloud):
    """Deregisters the images a test made, then deletes their root snapshots."""
    images: list[str] = []
    yield images
    for ami in images:
        try:
            cloud.ec2.deregister_image(ImageId=ami)
        except ClientError:
            pass
        for s in cloud.ec2.describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": "description", "Values": [f"*for {ami}"]}])["Snapshots"]:
            try:
                cloud.ec2.delete_snapshot(SnapshotId=s["SnapshotId"])
            except ClientError:
                pass


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def image(cloud, ami: str) -> dict:
    (img,) = cloud.ec2.describe_images(ImageIds=[ami])["Images"]
    return img


def stopped_instance(cloud, launcher, instance_type: str = "t2.micro") -> str:
    [iid] = launcher.run_ids(1, InstanceType=instance_type, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[iid])
    cloud.ec2.stop_instances(InstanceIds=[iid])
    cloud.wait("instance_stopped", InstanceIds=[iid])
    return iid


def admin_sha256(cloud, ami: str) -> str:
    proc = cloud.admin_run("--json", "images")
    assert proc.returncode == 0, proc.stderr
    (row,) = [i for i in json.loads(proc.stdout) if i["image_id"] == ami]
    return row["sha256"]


def test_an_image_of_a_stopped_instance_becomes_available_and_launches(cloud, launcher, made):
    account = cloud.ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"][0]["OwnerId"]
    iid = stopped_instance(cloud, launcher, "t2.small")
    name = unique("web (v1.0) [x86_64]/@'_")
    out = cloud.ec2.create_image(
        InstanceId=iid, Name=name, Description="made by the e2e suite", NoReboot=True,
        TagSpecifications=[
            {"ResourceType": "image", "Tags": [{"Key": "team", "Value": "web"}, {"Key": "n", "Value": "1"}]},
            {"ResourceType": "snapshot", "Tags": [{"Key": "of", "Value": "root"}]},
        ])
    ami = out["ImageId"]
    made.append(ami)
    assert AMI_RE.match(ami), ami

    # Pending while the node copies the root disk (the simulated copy takes 200 ms).
    img = image(cloud, ami)
    assert img["State"] == "pending", img
    [bdm] = img["BlockDeviceMappings"]
    sid = bdm["Ebs"]["SnapshotId"]
    (snap,) = cloud.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"]
    assert snap["State"] in ("pending", "completed")
    assert snap["VolumeId"] == "vol-ffffffff" and snap["VolumeSize"] == 10
    assert snap["Description"] == f"Created by CreateImage({iid}) for {ami}"
    assert snap["Tags"] == [{"Key": "of", "Value": "root"}]

    cloud.wait("image_available", ImageIds=[ami])
    img = image(cloud, ami)
    assert img["State"] == "available"
    assert (img["Name"], img["Description"], img["OwnerId"], img["Public"]) == (
        name, "made by the e2e suite", account, False)
    assert (img["ImageType"], img["Architecture"], img["VirtualizationType"], img["Hypervisor"]) == (
        "machine", "x86_64", "hvm", "xen")
    assert (img["RootDeviceType"], img["RootDeviceName"]) == ("ebs", "/dev/sda1")
    assert img["BlockDeviceMappings"] == [{"DeviceName": "/dev/sda1", "Ebs": {
        "SnapshotId": sid, "VolumeSize": 10, "DeleteOnTermination": True, "VolumeType": "gp2",
        "Encrypted": False}}]
    assert img["SourceInstanceId"] == iid
    assert img["ImageLocation"] == f"{account}/{name}"
    assert img["CreationDate"].endswith("Z") and img["PlatformDetails"] == "Linux/UNIX"
    assert "StateReason" not in img
    assert sorted((t["Key"], t["Value"]) for t in img["Tags"]) == [("n", "1"), ("team", "web")]
    (snap,) = cloud.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"]
    assert (snap["State"], snap["Progress"]) == ("completed", "100%")
    assert snap["FullSnapshotSizeInBytes"] > 1 << 20, "the simulated copy is a little over 1 MiB"

    # DescribeImages filters that find it, and ones that do not.
    mine = lambda **kw: [i["ImageId"] for i in cloud.ec2.describe_images(**kw)["Images"]]  # noqa: E731
    f = lambda n, *v: [{"Name": n, "Values": list(v)}]  # noqa: E731
    assert mine(Owners=["self"], Filters=f("name", name)) == [ami]
    for filters in (f("state", "available") + f("name", name), f("tag:team", "web") + f("tag:n", "1"),
                    f("tag-key", "team") + f("name", name), f("block-device-mapping.snapshot-id", sid),
                    f("root-device-type", "ebs") + f("name", name), f("source-instance-id", iid),
                    f("block-device-mapping.volume-size", "10") + f("name", name),
                    f("image-type", "machine") + f("is-public", "false") + f("name", name)):
        assert mine(Filters=filters) == [ami], filters
    assert mine(Filters=f("state", "pending") + f("name", name)) == []
    assert mine(Filters=f("tag:team", "db") + f("name", name)) == []
    assert ami not in mine(Filters=f("root-device-type", "instance-store"))
    assert ami not in mine(Owners=["amazon"])
    expect_error(cloud.ec2.describe_images, "InvalidParameterValue", Filters=f("no-such-filter", "x"))
    attr = cloud.ec2.describe_image_attribute(ImageId=ami, Attribute="blockDeviceMapping")
    assert attr["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == sid

    # Tags on the image through CreateTags too, and DescribeTags names its type.
    cloud.ec2.create_tags(Resources=[ami], Tags=[{"Key": "stage", "Value": "prod"}])
    tags = cloud.ec2.describe_tags(Filters=f("resource-id", ami))["Tags"]
    assert {(t["ResourceType"], t["Key"]) for t in tags} == {("image", "team"), ("image", "n"), ("image", "stage")}

    # Launches from it boot the uploaded copy of the source's root disk: the simulated
    # node's console names the bytes it boots from, which are the image's.
    [new] = launcher.run_ids(1, ImageId=ami, InstanceType="t2.small")
    cloud.wait("instance_running", InstanceIds=[new])
    console = cloud.ec2.get_console_output(InstanceId=new)["Output"]
    assert f"booting instance {new} from {ami}" in console
    assert f"root disk from {admin_sha256(cloud, ami)}" in console, console
    # A type whose root disk is smaller than the image's would cut it off.
    expect_error(launcher.run, "InvalidBlockDeviceMapping", ImageId=ami, InstanceType="t2.micro")

    # Its root snapshot stays while the image uses it; deregistering leaves it, as on EC2.
    expect_error(cloud.ec2.delete_snapshot, "InvalidSnapshot.InUse", SnapshotId=sid)
    cloud.ec2.deregister_image(ImageId=ami)
    expect_error(cloud.ec2.describe_images, "InvalidAMIID.NotFound", ImageIds=[ami])
    expect_error(launcher.run, "InvalidAMIID.Unavailable", ImageId=ami)
    assert cloud.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] == "completed"
    cloud.ec2.delete_snapshot(SnapshotId=sid)
    # The instance launched from it runs on.
    cloud.ec2.reboot_instances(InstanceIds=[new])


def test_errors_dry_run_and_refused_mappings(cloud, launcher, made):
    expect_error(cloud.ec2.create_image, "InvalidInstanceID.Malformed", InstanceId="i-nope", Name="some-name")
    expect_error(cloud.ec2.create_image, "InvalidInstanceID.NotFound", InstanceId="i-0123456789abcdef0",
                 Name="some-name")
    [running] = launcher.run_ids(1, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[running])
    e = expect_error(cloud.ec2.create_image, "IncorrectInstanceState", InstanceId=running, Name=unique("run"))
    assert "stopped instances only" in e.response["Error"]["Message"]

    iid = stopped_instance(cloud, launcher)
    for bad in ("no*stars", "tab\there", "naïve"):
        expect_error(cloud.ec2.create_image, "InvalidAMIName.Malformed", InstanceId=iid, Name=bad)
    # Lengths botocore checks itself: sent raw.
    for bad in ("ab", "x" * 129):
        resp = cloud.raw({"Action": "CreateImage", "InstanceId": iid, "Name": bad})
        assert (resp.status, resp.error()[0]) == (400, "InvalidAMIName.Malformed"), resp
    expect_error(cloud.ec2.create_image, "InvalidParameterValue", InstanceId=iid, Name=unique("d"),
                 Description="x" * 256)
    expect_error(cloud.ec2.create_image, "InvalidParameterValue", InstanceId=iid, Name=unique("t"),
                 TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "k", "Value": "v"}]}])
    expect_error(cloud.ec2.create_image, "InvalidBlockDeviceMapping", InstanceId=iid, Name=unique("b"),
                 BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 50}}])
    expect_error(cloud.ec2.create_image, "InvalidBlockDeviceMapping", InstanceId=iid, Name=unique("b"),
                 BlockDeviceMappings=[{"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}])
    expect_error(cloud.ec2.create_image, "InvalidBlockDeviceMapping", InstanceId=iid, Name=unique("b"),
                 BlockDeviceMappings=[{"DeviceName": "/dev/sda1", "NoDevice": ""}])

    name = unique("dry")
    expect_error(cloud.ec2.create_image, "DryRunOperation", 412, InstanceId=iid, Name=name, DryRun=True)
    assert cloud.ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"] == []
    # DryRun checks what the call would: a running instance is refused, not "would succeed".
    expect_error(cloud.ec2.create_image, "IncorrectInstanceState", InstanceId=running, Name=name, DryRun=True)

    # Leaving out a device the image does not have anyway is honoured.
    ami = cloud.ec2.create_image(InstanceId=iid, Name=name,
                                 BlockDeviceMappings=[{"DeviceName": "/dev/sdf", "NoDevice": ""}])["ImageId"]
    made.append(ami)
    # The name is the account's: taken while the image lives, pending or not.
    e = expect_error(cloud.ec2.create_image, "InvalidAMIName.Duplicate", InstanceId=iid, Name=name)
    assert ami in e.response["Error"]["Message"]
    cloud.wait("image_available", ImageIds=[ami])
    # A pending image can be deregistered; its name is free again.
    again = cloud.ec2.create_image(InstanceId=iid, Name=unique("again"))["ImageId"]
    made.append(again)
    assert image(cloud, again)["State"] == "pending"
    cloud.ec2.deregister_image(ImageId=again)
    expect_error(cloud.ec2.describe_images, "InvalidAMIID.NotFound", ImageIds=[again])
    cloud.ec2.deregister_image(ImageId=ami)
    third = cloud.ec2.create_image(InstanceId=iid, Name=name)["ImageId"]
    made.append(third)
    cloud.wait("image_available", ImageIds=[third])
    expect_error(cloud.ec2.create_tags, "InvalidAMIID.NotFound", Resources=[again],
                 Tags=[{"Key": "a", "Value": "b"}])


def test_a_start_or_a_terminate_while_the_image_is_pending_waits_for_the_copy(cloud, launcher, made):
    """The node copies the disk as it was stopped: a start asked meanwhile boots only once
    the copy is uploaded, and a terminate neither loses the copy nor cuts it short."""
    a = stopped_instance(cloud, launcher)
    b = stopped_instance(cloud, launcher)
    first = cloud.ec2.create_image(InstanceId=a, Name=unique("start"))["ImageId"]
    second = cloud.ec2.create_image(InstanceId=b, Name=unique("term"))["ImageId"]
    made.extend([first, second])
    cloud.ec2.start_instances(InstanceIds=[a])
    cloud.ec2.terminate_instances(InstanceIds=[b])
    cloud.wait("instance_running", InstanceIds=[a])
    assert image(cloud, first)["State"] == "available", "the start waited for the copy"
    cloud.wait("image_available", ImageIds=[second])
    cloud.wait("instance_terminated", InstanceIds=[b])
    # The image of the terminated instance launches.
    [c] = launcher.run_ids(1, ImageId=second)
    cloud.wait("instance_running", InstanceIds=[c])


def test_the_cli_creates_waits_describes_tags_and_deregisters(cloud, launcher, made):
    iid = stopped_instance(cloud, launcher)
    name = unique("cli")
    out = cloud.aws("ec2", "create-image", "--instance-id", iid, "--name", name, "--description", "from the cli",
                    "--no-reboot", "--tag-specifications", "ResourceType=image,Tags=[{Key=via,Value=cli}]")
    ami = out["ImageId"]
    made.append(ami)
    cloud.aws("ec2", "wait", "image-available", "--image-ids", ami)
    listed = cloud.aws("ec2", "describe-images", "--owners", "self",
                       "--filters", f"Name=name,Values={name}", "Name=tag:via,Values=cli")["Images"]
    assert [(i["ImageId"], i["State"], i["Description"]) for i in listed] == [(ami, "available", "from the cli")]
    cloud.aws("ec2", "create-tags", "--resources", ami, "--tags", "Key=owner,Value=ops")
    tags = cloud.aws("ec2", "describe-tags", "--filters", "Name=resource-type,Values=image",
                     f"Name=resource-id,Values={ami}")["Tags"]
    assert sorted(t["Key"] for t in tags) == ["owner", "via"]
    proc = cloud.aws_run("ec2", "create-image", "--instance-id", iid, "--name", name)
    assert proc.returncode != 0 and "InvalidAMIName.Duplicate" in proc.stderr, proc.stderr
    proc = cloud.aws_run("ec2", "create-image", "--instance-id", iid, "--name", unique("dry"), "--dry-run")
    assert proc.returncode != 0 and "DryRunOperation" in proc.stderr, proc.stderr
    cloud.aws("ec2", "deregister-image", "--image-id", ami)
    assert cloud.aws("ec2", "describe-images", "--owners", "self",
                     "--filters", f"Name=name,Values={name}")["Images"] == []
