"""Elastic IPs with boto3 and the AWS CLI: allocate from the region's pool, associate with an
instance (shown as its public address), move, disassociate, release, tags, filters, and
EC2's errors."""

import ipaddress
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import expect_error

# `canopy dev`'s default pool.
POOL = ipaddress.ip_network("198.51.100.0/24")



@pytest.fixture
def eips(cloud):
    made: list[str] = []

    def allocate(**kwargs):
        resp = cloud.ec2.allocate_address(Domain="vpc", **kwargs)
        made.append(resp["AllocationId"])
        return resp

    yield allocate
    for alloc in made:
        try:
            [addr] = cloud.ec2.describe_addresses(AllocationIds=[alloc])["Addresses"]
            if "AssociationId" in addr:
                cloud.ec2.disassociate_address(AssociationId=addr["AssociationId"])
            cloud.ec2.release_address(AllocationId=alloc)
        except ClientError:
            pass


def public_ip_of(cloud, iid):
    return cloud.instances(InstanceIds=[iid])[0].get("PublicIpAddress")


def test_allocate_associate_move_disassociate_release(cloud, eips, launcher):
    a = eips(TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": [{"Key": "Name", "Value": "front"}]}])
    assert a["AllocationId"].startswith("eipalloc-") and a["Domain"] == "vpc"
    assert ipaddress.ip_address(a["PublicIp"]) in POOL
    b = eips()
    assert b["PublicIp"] != a["PublicIp"]
    [x, y] = launcher.run_ids(2)
    cloud.wait("instance_running", InstanceIds=[x, y])

    assoc = cloud.ec2.associate_address(AllocationId=a["AllocationId"], InstanceId=x)["AssociationId"]
    assert assoc.startswith("eipassoc-")
    assert public_ip_of(cloud, x) == a["PublicIp"]
    [addr] = cloud.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"]
    assert (addr["InstanceId"], addr["AssociationId"], addr["PublicIp"]) == (x, assoc, a["PublicIp"])
    assert addr["PrivateIpAddress"] == cloud.instances(InstanceIds=[x])[0]["PrivateIpAddress"]
    assert addr["Tags"] == [{"Key": "Name", "Value": "front"}]
    by_filter = cloud.ec2.describe_addresses(Filters=[{"Name": "instance-id", "Values": [x]}])["Addresses"]
    assert [f["AllocationId"] for f in by_filter] == [a["AllocationId"]]
    found = cloud.instances(Filters=[launcher.filter, {"Name": "ip-address", "Values": [a["PublicIp"]]}])
    assert [i["InstanceId"] for i in found] == [x]

    # Moving it needs AllowReassociation; then y has it and x has none.
    expect_error(cloud.ec2.associate_address, "Resource.AlreadyAssociated", AllocationId=a["AllocationId"], InstanceId=y)
    cloud.ec2.associate_address(AllocationId=a["AllocationId"], InstanceId=y, AllowReassociation=True)
    assert public_ip_of(cloud, y) == a["PublicIp"] and public_ip_of(cloud, x) is None
    # An instance has one: associating b with y replaces a.
    cloud.ec2.associate_address(AllocationId=b["AllocationId"], InstanceId=y)
    assert public_ip_of(cloud, y) == b["PublicIp"]
    [addr_a] = cloud.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"]
    assert "InstanceId" not in addr_a

    # Released only once disassociated.
    expect_error(cloud.ec2.release_address, "InvalidIPAddress.InUse", AllocationId=b["AllocationId"])
    [addr_b] = cloud.ec2.describe_addresses(AllocationIds=[b["AllocationId"]])["Addresses"]
    cloud.ec2.disassociate_address(AssociationId=addr_b["AssociationId"])
    assert public_ip_of(cloud, y) is None
    cloud.ec2.release_address(AllocationId=b["AllocationId"])
    expect_error(cloud.ec2.describe_addresses, "InvalidAllocationID.NotFound", AllocationIds=[b["AllocationId"]])

    # Terminating an instance takes its address back (still allocated to the account).
    cloud.ec2.associate_address(AllocationId=a["AllocationId"], InstanceId=x)
    cloud.ec2.terminate_instances(InstanceIds=[x])
    cloud.wait("instance_terminated", InstanceIds=[x])
    [addr_a] = cloud.ec2.describe_addresses(AllocationIds=[a["AllocationId"]])["Addresses"]
    assert "InstanceId" not in addr_a


def test_errors_and_dry_run(cloud, eips, launcher):
    expect_error(cloud.ec2.release_address, "InvalidAllocationID.NotFound", AllocationId="eipalloc-0123456789abcdef0")
    expect_error(cloud.ec2.release_address, "InvalidAllocationID.Malformed", AllocationId="nope")
    expect_error(cloud.ec2.disassociate_address, "InvalidAssociationID.NotFound", AssociationId="eipassoc-0123456789abcdef0")
    expect_error(cloud.ec2.describe_addresses, "InvalidAddress.NotFound", PublicIps=["203.0.113.9"])
    expect_error(cloud.ec2.allocate_address, "DryRunOperation", status=412, Domain="vpc", DryRun=True)
    a = eips()
    expect_error(cloud.ec2.associate_address, "InvalidInstanceID.NotFound", AllocationId=a["AllocationId"],
           InstanceId="i-0123456789abcdef0")
    # A specific address from the pool, once.
    free = str(next(h for h in list(POOL.hosts())[10:]
                    if str(h) not in {x["PublicIp"] for x in cloud.ec2.describe_addresses()["Addresses"]}))
    got = eips(Address=free)
    assert got["PublicIp"] == free
    expect_error(cloud.ec2.allocate_address, "InvalidAddress.InUse", Domain="vpc", Address=free)
    expect_error(cloud.ec2.allocate_address, "InvalidAddress.NotFound", Domain="vpc", Address="203.0.113.1")
    # Tags by allocation id.
    cloud.ec2.create_tags(Resources=[a["AllocationId"]], Tags=[{"Key": "team", "Value": uuid.uuid4().hex}])
    tagged = cloud.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [a["AllocationId"]]}])["Tags"]
    assert tagged[0]["ResourceType"] == "elastic-ip"


def test_cli_allocate_and_release(cloud):
    out = cloud.aws("ec2", "allocate-address", "--domain", "vpc")
    alloc = out["AllocationId"]
    listed = cloud.aws("ec2", "describe-addresses", "--allocation-ids", alloc)
    assert listed["Addresses"][0]["PublicIp"] == out["PublicIp"]
    cloud.aws("ec2", "release-address", "--allocation-id", alloc)
    assert alloc not in str(cloud.aws("ec2", "describe-addresses"))
