"""Volumes with boto3 (its waiters and paginator) and the AWS CLI: create in a zone, attach
to a running or stopped instance (attaching until the node has it), detach, delete, tags,
filters, client tokens, and EC2's errors. The shared cloud's nodes are simulated: the
libvirt driver's side (qcow2 files, disks in the guest's definition) is in
node-controller/tests/libvirt.rs and test_libvirt.py."""

import uuid

import pytest

from conftest import WAIT, eventually, expect_error, remove_volumes

ZONE = "canopy-1a"
OTHER_ZONE = "canopy-1b"


@pytest.fixture
def volumes(cloud):
    made: list[str] = []

    def create(**kwargs):
        kwargs.setdefault("AvailabilityZone", ZONE)
        kwargs.setdefault("Size", 8)
        resp = cloud.ec2.create_volume(**kwargs)
        made.append(resp["VolumeId"])
        return resp

    yield create
    remove_volumes(cloud.ec2, made)


def volume(cloud, vid: str) -> dict:
    [v] = cloud.ec2.describe_volumes(VolumeIds=[vid])["Volumes"]
    return v


def attachment_state(cloud, vid: str) -> str | None:
    attachments = volume(cloud, vid)["Attachments"]
    return attachments[0]["State"] if attachments else None


def bdm(cloud, iid: str) -> list[dict]:
    return cloud.instances(InstanceIds=[iid])[0].get("BlockDeviceMappings", [])


def test_create_attach_detach_delete_with_waiters(cloud, volumes, launcher):
    v = volumes(Size=8, TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": "data"}]}])
    vid = v["VolumeId"]
    assert vid.startswith("vol-") and len(vid) == 21
    assert (v["Size"], v["AvailabilityZone"], v["VolumeType"], v["Encrypted"]) == (8, ZONE, "gp2", False)
    assert v["Iops"] == 100, "gp2's baseline: 3 IOPS per GiB, at least 100"
    assert v["Tags"] == [{"Key": "Name", "Value": "data"}]
    cloud.wait("volume_available", VolumeIds=[vid])

    [iid] = launcher.run_ids(1, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[iid])
    att = cloud.ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    assert (att["VolumeId"], att["InstanceId"], att["Device"], att["State"]) == (vid, iid, "/dev/sdf", "attaching")
    cloud.wait("volume_in_use", VolumeIds=[vid])
    # `attached` once the node has it.
    assert eventually(lambda: attachment_state(cloud, vid), lambda s: s == "attached") == "attached"
    shown = volume(cloud, vid)
    assert shown["State"] == "in-use"
    [a] = shown["Attachments"]
    assert (a["InstanceId"], a["Device"], a["DeleteOnTermination"]) == (iid, "/dev/sdf", False)
    [m] = bdm(cloud, iid)
    assert m["DeviceName"] == "/dev/sdf"
    assert (m["Ebs"]["VolumeId"], m["Ebs"]["Status"]) == (vid, "attached")

    by = lambda name, value: [  # noqa: E731
        x["VolumeId"] for x in cloud.ec2.describe_volumes(Filters=[{"Name": name, "Values": [value]}])["Volumes"]
    ]
    assert by("attachment.instance-id", iid) == [vid]
    assert vid in by("status", "in-use")
    assert vid in by("tag:Name", "data")
    assert vid not in by("status", "available")
    assert vid in by("attachment.device", "/dev/sdf")

    # Attached: it cannot be deleted, nor attached again; its device is taken.
    expect_error(cloud.ec2.delete_volume, "VolumeInUse", VolumeId=vid)
    other = volumes(Size=1)["VolumeId"]
    expect_error(cloud.ec2.attach_volume, "VolumeInUse", VolumeId=vid, InstanceId=iid, Device="/dev/sdg")
    expect_error(cloud.ec2.attach_volume, "InvalidParameterValue", VolumeId=other, InstanceId=iid, Device="/dev/xvdf")

    det = cloud.ec2.detach_volume(VolumeId=vid, InstanceId=iid)
    assert (det["State"], det["InstanceId"], det["Device"]) == ("detaching", iid, "/dev/sdf")
    cloud.wait("volume_available", VolumeIds=[vid])
    assert volume(cloud, vid)["Attachments"] == []
    assert bdm(cloud, iid) == []
    expect_error(cloud.ec2.detach_volume, "IncorrectState", VolumeId=vid)

    cloud.ec2.delete_volume(VolumeId=vid)
    cloud.wait("volume_deleted", VolumeIds=[vid])
    expect_error(cloud.ec2.describe_volumes, "InvalidVolume.NotFound", VolumeIds=[vid])
    expect_error(cloud.ec2.delete_volume, "InvalidVolume.NotFound", VolumeId=vid)


def test_a_stopped_instance_takes_a_volume_and_termination_frees_it(cloud, volumes, launcher):
    vid = volumes(Size=2)["VolumeId"]
    [iid] = launcher.run_ids(1, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[iid])
    cloud.ec2.stop_instances(InstanceIds=[iid])
    cloud.wait("instance_stopped", InstanceIds=[iid])
    cloud.ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/xvdh")
    assert eventually(lambda: attachment_state(cloud, vid), lambda s: s == "attached") == "attached"
    cloud.ec2.start_instances(InstanceIds=[iid])
    cloud.wait("instance_running", InstanceIds=[iid])
    assert attachment_state(cloud, vid) == "attached"

    cloud.ec2.terminate_instances(InstanceIds=[iid])
    cloud.wait("instance_terminated", InstanceIds=[iid])
    cloud.wait("volume_available", VolumeIds=[vid])
    assert volume(cloud, vid)["Attachments"] == []


def test_volume_errors_are_ec2s(cloud, volumes, launcher):
    ec2 = cloud.ec2
    expect_error(ec2.create_volume, "InvalidParameterValue", AvailabilityZone="nowhere-1z", Size=1)
    expect_error(ec2.create_volume, "MissingParameter", AvailabilityZone=ZONE)
    expect_error(ec2.create_volume, "InvalidParameterValue", AvailabilityZone=ZONE, Size=0)
    expect_error(ec2.create_volume, "InvalidParameterValue", AvailabilityZone=ZONE, Size=16385)
    expect_error(ec2.create_volume, "InvalidParameterValue", AvailabilityZone=ZONE, Size=10, VolumeType="st1")
    expect_error(ec2.create_volume, "MissingParameter", AvailabilityZone=ZONE, Size=10, VolumeType="io1")
    expect_error(ec2.create_volume, "InvalidParameterCombination", AvailabilityZone=ZONE, Size=10, Iops=500)
    expect_error(ec2.create_volume, "InvalidParameterValue", AvailabilityZone=ZONE, Size=10, VolumeType="floppy")
    expect_error(ec2.create_volume, "InvalidSnapshot.NotFound", AvailabilityZone=ZONE,
                 SnapshotId="snap-0123456789abcdef0")
    expect_error(ec2.create_volume, "UnsupportedOperation", AvailabilityZone=ZONE, Size=1, Encrypted=True)
    expect_error(ec2.create_volume, "DryRunOperation", 412, AvailabilityZone=ZONE, Size=1, DryRun=True)
    io1 = volumes(Size=10, VolumeType="io1", Iops=500)
    assert (io1["VolumeType"], io1["Iops"]) == ("io1", 500)
    gp3 = volumes(Size=10, VolumeType="gp3")
    assert (gp3["Iops"], gp3["Throughput"]) == (3000, 125)

    missing = "vol-0123456789abcdef0"
    expect_error(ec2.describe_volumes, "InvalidVolume.NotFound", VolumeIds=[missing])
    expect_error(ec2.describe_volumes, "InvalidVolume.Malformed", VolumeIds=["vol-nope"])
    expect_error(ec2.delete_volume, "InvalidVolume.NotFound", VolumeId=missing)
    expect_error(ec2.describe_volumes, "InvalidParameterValue", Filters=[{"Name": "bogus", "Values": ["x"]}])

    far = volumes(Size=1, AvailabilityZone=OTHER_ZONE)["VolumeId"]
    [iid] = launcher.run_ids(1, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[iid])
    expect_error(ec2.attach_volume, "InvalidVolume.ZoneMismatch", VolumeId=far, InstanceId=iid, Device="/dev/sdf")
    expect_error(ec2.attach_volume, "InvalidVolume.NotFound", VolumeId=missing, InstanceId=iid, Device="/dev/sdf")
    expect_error(ec2.attach_volume, "InvalidInstanceID.NotFound", VolumeId=io1["VolumeId"],
                 InstanceId="i-0123456789abcdef0", Device="/dev/sdf")
    for bad in ("/dev/sda1", "/dev/sda", "sdf", "/dev/nvme1n1"):
        expect_error(ec2.attach_volume, "InvalidParameterValue", VolumeId=io1["VolumeId"], InstanceId=iid, Device=bad)
    expect_error(ec2.attach_volume, "DryRunOperation", 412, VolumeId=io1["VolumeId"], InstanceId=iid,
                 Device="/dev/sdf", DryRun=True)
    assert volume(cloud, io1["VolumeId"])["State"] == "available", "a dry run changes nothing"
    cloud.ec2.attach_volume(VolumeId=io1["VolumeId"], InstanceId=iid, Device="/dev/sdf")
    expect_error(ec2.detach_volume, "InvalidAttachment.NotFound", VolumeId=io1["VolumeId"], Device="/dev/sdz")
    # Force: detached at once, without waiting for the node.
    cloud.ec2.detach_volume(VolumeId=io1["VolumeId"], Force=True)
    assert volume(cloud, io1["VolumeId"])["State"] == "available"


def test_client_token_makes_one_volume(cloud, volumes):
    token = uuid.uuid4().hex
    a = volumes(Size=3, ClientToken=token)
    b = volumes(Size=3, ClientToken=token)
    assert a["VolumeId"] == b["VolumeId"]
    mine = cloud.ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [a["VolumeId"]]}])["Volumes"]
    assert len(mine) == 1


def test_pages_tags_and_the_cli(cloud, volumes):
    made = {volumes(Size=1)["VolumeId"] for _ in range(7)}
    seen = []
    for page in cloud.ec2.get_paginator("describe_volumes").paginate(PaginationConfig={"PageSize": 5}):
        assert len(page["Volumes"]) <= 5
        seen.extend(v["VolumeId"] for v in page["Volumes"])
    assert made <= set(seen) and len(seen) == len(set(seen))
    expect_error(cloud.ec2.describe_volumes, "InvalidParameterCombination", VolumeIds=[next(iter(made))],
                 MaxResults=5)

    vid = sorted(made)[0]
    cloud.ec2.create_tags(Resources=[vid], Tags=[{"Key": "team", "Value": "db"}])
    tags = cloud.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [vid]}])["Tags"]
    assert [(t["Key"], t["Value"], t["ResourceType"]) for t in tags] == [("team", "db", "volume")]
    cloud.ec2.delete_tags(Resources=[vid], Tags=[{"Key": "team"}])
    assert volume(cloud, vid).get("Tags", []) == []

    out = cloud.aws("ec2", "create-volume", "--size", "4", "--availability-zone", ZONE, "--volume-type", "gp3")
    cli_vid = out["VolumeId"]
    try:
        cloud.aws("ec2", "wait", "volume-available", "--volume-ids", cli_vid)
        [shown] = cloud.aws("ec2", "describe-volumes", "--volume-ids", cli_vid)["Volumes"]
        assert (shown["Size"], shown["VolumeType"], shown["State"]) == (4, "gp3", "available")
    finally:
        cloud.aws("ec2", "delete-volume", "--volume-id", cli_vid)
    cloud.aws("ec2", "wait", "volume-deleted", "--volume-ids", cli_vid)
