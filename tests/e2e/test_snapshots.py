"""Snapshots with boto3 (its waiter and paginator) and the AWS CLI: a snapshot of a volume
a node holds goes pending -> completed through the node's upload (NC -> CC -> CLC image
store), one of a volume never attached completes at once, volumes made from snapshots,
filters, tags, paging and EC2's errors. The shared cloud's nodes are simulated (their
copies are a small real byte stream); the libvirt round trip (bytes written, snapshot,
volume made from it, bytes compared) is in test_libvirt.py."""

import pytest
from botocore.exceptions import ClientError

from conftest import eventually, expect_error, remove_volumes

ZONE = "canopy-1a"


@pytest.fixture
def made(cloud):
    """Deletes what a test made: volumes (detached first) and snapshots."""
    things: dict[str, list[str]] = {"volumes": [], "snapshots": []}
    yield things
    for sid in things["snapshots"]:
        try:
            cloud.ec2.delete_snapshot(SnapshotId=sid)
        except ClientError:
            pass
    remove_volumes(cloud.ec2, things["volumes"])


def snapshot(cloud, sid: str) -> dict:
    [s] = cloud.ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"]
    return s


def attached_volume(cloud, made, launcher, size: int = 4) -> tuple[str, str]:
    vid = cloud.ec2.create_volume(AvailabilityZone=ZONE, Size=size)["VolumeId"]
    made["volumes"].append(vid)
    [iid] = launcher.run_ids(1, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[iid])
    cloud.ec2.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    eventually(lambda: cloud.ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["Attachments"],
               lambda a: a and a[0]["State"] == "attached")
    return vid, iid


def test_snapshot_of_an_attached_volume_is_uploaded_by_its_node(cloud, made, launcher):
    vid, _ = attached_volume(cloud, made, launcher, size=4)
    s = cloud.ec2.create_snapshot(
        VolumeId=vid, Description="before the upgrade",
        TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": "Name", "Value": "nightly"}]}])
    sid = s["SnapshotId"]
    made["snapshots"].append(sid)
    assert sid.startswith("snap-") and len(sid) == 22
    assert (s["VolumeId"], s["State"], s["VolumeSize"], s["Description"]) == (vid, "pending", 4, "before the upgrade")
    assert s["Progress"] == "0%" and s["Encrypted"] is False
    assert s["OwnerId"] and s["StartTime"]
    assert s["Tags"] == [{"Key": "Name", "Value": "nightly"}]
    cloud.wait("snapshot_completed", SnapshotIds=[sid])
    done = snapshot(cloud, sid)
    assert (done["State"], done["Progress"]) == ("completed", "100%")
    assert done["FullSnapshotSizeInBytes"] > 1 << 20, "the simulated copy is a little over 1 MiB"

    # A volume from it: the snapshot's size by default, and it names the snapshot.
    v = cloud.ec2.create_volume(AvailabilityZone=ZONE, SnapshotId=sid)
    made["volumes"].append(v["VolumeId"])
    assert (v["Size"], v["SnapshotId"]) == (4, sid)
    bigger = cloud.ec2.create_volume(AvailabilityZone=ZONE, SnapshotId=sid, Size=10)
    made["volumes"].append(bigger["VolumeId"])
    assert bigger["Size"] == 10
    by_snapshot = cloud.ec2.describe_volumes(Filters=[{"Name": "snapshot-id", "Values": [sid]}])["Volumes"]
    assert {x["VolumeId"] for x in by_snapshot} == {v["VolumeId"], bigger["VolumeId"]}
    expect_error(cloud.ec2.create_volume, "InvalidParameterValue", AvailabilityZone=ZONE, SnapshotId=sid, Size=2)

    # The new volume attached elsewhere has the snapshot's bytes; its own snapshot completes.
    [iid2] = launcher.run_ids(1, Placement={"AvailabilityZone": ZONE})
    cloud.wait("instance_running", InstanceIds=[iid2])
    cloud.ec2.attach_volume(VolumeId=v["VolumeId"], InstanceId=iid2, Device="/dev/sdg")
    again = cloud.ec2.create_snapshot(VolumeId=v["VolumeId"])["SnapshotId"]
    made["snapshots"].append(again)
    cloud.wait("snapshot_completed", SnapshotIds=[again])


def test_snapshot_of_a_volume_never_attached_completes_at_once(cloud, made):
    vid = cloud.ec2.create_volume(AvailabilityZone=ZONE, Size=2)["VolumeId"]
    made["volumes"].append(vid)
    s = cloud.ec2.create_snapshot(VolumeId=vid)
    made["snapshots"].append(s["SnapshotId"])
    assert (s["State"], s["Progress"], s["VolumeSize"]) == ("completed", "100%", 2)
    assert s["Description"] == ""
    # A snapshot of a volume made from it is the same snapshot's bytes: completed at once too.
    v2 = cloud.ec2.create_volume(AvailabilityZone=ZONE, SnapshotId=s["SnapshotId"])["VolumeId"]
    made["volumes"].append(v2)
    s2 = cloud.ec2.create_snapshot(VolumeId=v2)
    made["snapshots"].append(s2["SnapshotId"])
    assert s2["State"] == "completed"


def test_describe_filters_owners_paging_and_cli(cloud, made):
    vid = cloud.ec2.create_volume(AvailabilityZone=ZONE, Size=3)["VolumeId"]
    made["volumes"].append(vid)
    sids = []
    for n in range(6):
        sid = cloud.ec2.create_snapshot(
            VolumeId=vid, Description=f"copy {n}",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": "n", "Value": str(n)}]}],
        )["SnapshotId"]
        made["snapshots"].append(sid)
        sids.append(sid)
    ours = lambda **kw: [s["SnapshotId"] for s in cloud.ec2.describe_snapshots(**kw)["Snapshots"]  # noqa: E731
                         if s["SnapshotId"] in sids]
    f = lambda name, *values: [{"Name": name, "Values": list(values)}]  # noqa: E731
    assert ours(OwnerIds=["self"]) == sids
    assert ours(OwnerIds=[cloud.ec2.describe_snapshots(SnapshotIds=[sids[0]])["Snapshots"][0]["OwnerId"]]) == sids
    assert ours(OwnerIds=["amazon"]) == []
    assert ours(RestorableByUserIds=["self"]) == sids
    assert ours(Filters=f("volume-id", vid)) == sids
    assert ours(Filters=f("description", "copy 1", "copy 3")) == [sids[1], sids[3]]
    assert ours(Filters=f("description", "copy *")) == sids
    assert ours(Filters=f("status", "completed") + f("volume-size", "3")) == sids
    assert ours(Filters=f("progress", "100%")) == sids
    assert ours(Filters=f("snapshot-id", sids[2])) == [sids[2]]
    assert ours(Filters=f("tag:n", "4")) == [sids[4]]
    assert ours(Filters=f("tag-key", "n") + f("tag-value", "5")) == [sids[5]]
    assert ours(Filters=f("owner-id", "nobody")) == []
    assert ours(Filters=f("start-time", "20*")) == sids
    expect_error(cloud.ec2.describe_snapshots, "InvalidParameterValue", Filters=f("no-such-filter", "x"))

    pages = list(cloud.ec2.get_paginator("describe_snapshots").paginate(
        OwnerIds=["self"], Filters=f("volume-id", vid), PaginationConfig={"PageSize": 5}))
    assert [len(p["Snapshots"]) for p in pages] == [5, 1]
    assert [s["SnapshotId"] for p in pages for s in p["Snapshots"]] == sids
    expect_error(cloud.ec2.describe_snapshots, "InvalidParameterCombination", SnapshotIds=[sids[0]], MaxResults=5)

    cli = cloud.aws("ec2", "describe-snapshots", "--owner-ids", "self", "--page-size", "5",
                    "--filters", f"Name=volume-id,Values={vid}")["Snapshots"]
    assert [s["SnapshotId"] for s in cli] == sids
    out = cloud.aws("ec2", "create-snapshot", "--volume-id", vid, "--description", "from the cli")
    made["snapshots"].append(out["SnapshotId"])
    cloud.aws("ec2", "wait", "snapshot-completed", "--snapshot-ids", out["SnapshotId"])
    cloud.aws("ec2", "delete-snapshot", "--snapshot-id", out["SnapshotId"])
    expect_error(cloud.ec2.describe_snapshots, "InvalidSnapshot.NotFound", SnapshotIds=[out["SnapshotId"]])


def test_errors_dry_run_tags_and_delete(cloud, made):
    missing = "snap-0123456789abcdef0"
    expect_error(cloud.ec2.create_snapshot, "InvalidVolume.NotFound", VolumeId="vol-0123456789abcdef0")
    expect_error(cloud.ec2.create_snapshot, "InvalidVolume.Malformed", VolumeId="volume-1")
    expect_error(cloud.ec2.describe_snapshots, "InvalidSnapshot.NotFound", SnapshotIds=[missing])
    expect_error(cloud.ec2.describe_snapshots, "InvalidSnapshot.Malformed", SnapshotIds=["snap-x"])
    expect_error(cloud.ec2.delete_snapshot, "InvalidSnapshot.NotFound", SnapshotId=missing)
    expect_error(cloud.ec2.create_volume, "InvalidSnapshot.NotFound", AvailabilityZone=ZONE, SnapshotId=missing)

    vid = cloud.ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
    made["volumes"].append(vid)
    expect_error(cloud.ec2.create_snapshot, "DryRunOperation", 412, VolumeId=vid, DryRun=True)
    assert [s for s in cloud.ec2.describe_snapshots(Filters=[{"Name": "volume-id", "Values": [vid]}])["Snapshots"]] == []
    expect_error(cloud.ec2.create_snapshot, "InvalidParameterValue", VolumeId=vid,
                 TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "k", "Value": "v"}]}])
    sid = cloud.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    made["snapshots"].append(sid)

    cloud.ec2.create_tags(Resources=[sid], Tags=[{"Key": "team", "Value": "storage"}])
    assert snapshot(cloud, sid)["Tags"] == [{"Key": "team", "Value": "storage"}]
    tags = cloud.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [sid]}])["Tags"]
    assert [(t["ResourceType"], t["Key"]) for t in tags] == [("snapshot", "team")]
    expect_error(cloud.ec2.create_tags, "InvalidSnapshot.NotFound", Resources=[missing],
                 Tags=[{"Key": "a", "Value": "b"}])

    expect_error(cloud.ec2.delete_snapshot, "DryRunOperation", 412, SnapshotId=sid, DryRun=True)
    cloud.ec2.delete_snapshot(SnapshotId=sid)
    expect_error(cloud.ec2.describe_snapshots, "InvalidSnapshot.NotFound", SnapshotIds=[sid])
    cloud.ec2.delete_volume(VolumeId=vid)


def test_a_pending_snapshot_refuses_volumes_and_outlives_its_volume(cloud, made, launcher):
    """A volume cannot be made from a snapshot that is not completed (IncorrectState); a
    completed one outlives its volume. (A copy that fails, `error`, is tested with the
    simulated driver's failure hook in node-controller/tests/agent.rs.)"""
    vid, _ = attached_volume(cloud, made, launcher, size=1)
    sid = cloud.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    made["snapshots"].append(sid)
    if snapshot(cloud, sid)["State"] == "pending":
        try:
            v = cloud.ec2.create_volume(AvailabilityZone=ZONE, SnapshotId=sid)
            made["volumes"].append(v["VolumeId"])
            # Completed in between: nothing to check.
            assert snapshot(cloud, sid)["State"] == "completed"
        except ClientError as e:
            assert e.response["Error"]["Code"] == "IncorrectState"
    cloud.wait("snapshot_completed", SnapshotIds=[sid])
    # Deleting the volume while the snapshot exists is fine: the snapshot keeps its bytes.
    cloud.ec2.detach_volume(VolumeId=vid)
    cloud.wait("volume_available", VolumeIds=[vid])
    cloud.ec2.delete_volume(VolumeId=vid)
    v = cloud.ec2.create_volume(AvailabilityZone=ZONE, SnapshotId=sid)
    made["volumes"].append(v["VolumeId"])
    assert v["SnapshotId"] == sid


def test_a_volume_deleted_right_after_its_snapshot_was_asked_for(cloud, made, launcher):
    vid, iid = attached_volume(cloud, made, launcher, size=1)
    cloud.ec2.detach_volume(VolumeId=vid)
    cloud.wait("volume_available", VolumeIds=[vid])
    sid = cloud.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    made["snapshots"].append(sid)
    cloud.ec2.delete_volume(VolumeId=vid)
    cloud.wait("snapshot_completed", SnapshotIds=[sid])
    assert snapshot(cloud, sid)["VolumeId"] == vid
