"""Read-only catalogue calls (zones, regions, instance types, images) and tags."""

import pytest
from botocore.exceptions import ClientError

from conftest import error_code, http_status


def test_describe_availability_zones(cloud):
    zones = cloud.ec2.describe_availability_zones()["AvailabilityZones"]
    by_name = {z["ZoneName"]: z for z in zones}
    assert set(by_name) == set(cloud.zones)
    z = by_name["canopy-1a"]
    assert z["State"] == "available"
    assert z["RegionName"] == "canopy-1" == cloud.region
    assert z.get("ZoneType", "availability-zone") == "availability-zone"

    only = cloud.ec2.describe_availability_zones(ZoneNames=["canopy-1b"])["AvailabilityZones"]
    assert [z["ZoneName"] for z in only] == ["canopy-1b"]
    filtered = cloud.ec2.describe_availability_zones(
        Filters=[{"Name": "zone-name", "Values": ["canopy-1a"]}])["AvailabilityZones"]
    assert [z["ZoneName"] for z in filtered] == ["canopy-1a"]
    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_availability_zones(ZoneNames=["canopy-1z"])
    assert error_code(exc.value) == "InvalidParameterValue"


def test_describe_regions(cloud):
    regions = cloud.ec2.describe_regions()["Regions"]
    assert [r["RegionName"] for r in regions] == ["canopy-1"]
    assert regions[0]["Endpoint"]
    assert cloud.ec2.describe_regions(RegionNames=["canopy-1"])["Regions"][0]["RegionName"] == "canopy-1"


def test_describe_instance_types(cloud):
    (micro,) = cloud.ec2.describe_instance_types(InstanceTypes=["t2.micro"])["InstanceTypes"]
    assert micro["InstanceType"] == "t2.micro"
    assert micro["VCpuInfo"]["DefaultVCpus"] == 1
    assert micro["MemoryInfo"]["SizeInMiB"] == 1024

    every = cloud.ec2.describe_instance_types()["InstanceTypes"]
    names = [t["InstanceType"] for t in every]
    assert "t2.micro" in names and len(names) == len(set(names))
    for t in every:
        assert t["VCpuInfo"]["DefaultVCpus"] >= 1 and t["MemoryInfo"]["SizeInMiB"] >= 256

    paged = [t["InstanceType"] for p in cloud.ec2.get_paginator("describe_instance_types").paginate(
        PaginationConfig={"PageSize": 5}) for t in p["InstanceTypes"]]
    assert sorted(paged) == sorted(names)

    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_instance_types(InstanceTypes=["t9.huge"])
    assert error_code(exc.value) == "InvalidInstanceType"
    assert http_status(exc.value) == 400


def test_describe_images(cloud):
    images = cloud.ec2.describe_images()["Images"]
    sim = [i for i in images if i["Name"] == "canopy-sim-linux"]
    assert len(sim) == 1
    img = sim[0]
    assert img["ImageId"] == cloud.image_id and img["ImageId"].startswith("ami-")
    assert img["State"] == "available"
    assert img["Architecture"] == "x86_64"

    mine = cloud.ec2.describe_images(Owners=["self"])["Images"]
    assert cloud.image_id in [i["ImageId"] for i in mine], "the admin account registered the image"
    (byid,) = cloud.ec2.describe_images(ImageIds=[cloud.image_id])["Images"]
    assert byid["Name"] == "canopy-sim-linux"

    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_images(ImageIds=["ami-0123456789abcdef0"])
    assert error_code(exc.value) == "InvalidAMIID.NotFound"
    assert http_status(exc.value) == 400


def test_tags_round_trip(cloud, launcher):
    (a, b) = launcher.run_ids(2)
    cloud.ec2.create_tags(Resources=[a, b], Tags=[{"Key": "env", "Value": "e2e"}, {"Key": "team", "Value": "infra"}])
    cloud.ec2.create_tags(Resources=[a], Tags=[{"Key": "Name", "Value": "alpha"}])

    def tags(*filters):
        out = []
        for page in cloud.ec2.get_paginator("describe_tags").paginate(
                Filters=[{"Name": "resource-id", "Values": [a, b]}, *filters]):
            out.extend((t["ResourceId"], t["Key"], t["Value"]) for t in page["Tags"])
        return sorted(out)

    every = tags()
    assert (a, "Name", "alpha") in every
    assert (a, "env", "e2e") in every and (b, "env", "e2e") in every
    assert (b, "team", "infra") in every
    assert (a, launcher.TAG_KEY, launcher.tag) in every  # from TagSpecifications
    assert all(t["ResourceType"] == "instance" for t in cloud.ec2.describe_tags(
        Filters=[{"Name": "resource-id", "Values": [a]}])["Tags"])

    assert tags({"Name": "key", "Values": ["Name"]}) == [(a, "Name", "alpha")]
    assert tags({"Name": "value", "Values": ["infra"]}) == sorted([(a, "team", "infra"), (b, "team", "infra")])
    assert tags({"Name": "resource-type", "Values": ["instance"]}) == every
    assert tags({"Name": "key", "Values": ["nope"]}) == []

    # Overwriting a tag replaces its value.
    cloud.ec2.create_tags(Resources=[b], Tags=[{"Key": "env", "Value": "prod"}])
    assert tags({"Name": "key", "Values": ["env"]}) == sorted([(a, "env", "e2e"), (b, "env", "prod")])

    # DeleteTags: by key; with a value only when it matches.
    cloud.ec2.delete_tags(Resources=[a, b], Tags=[{"Key": "team"}])
    cloud.ec2.delete_tags(Resources=[a, b], Tags=[{"Key": "env", "Value": "e2e"}])
    left = tags()
    assert not [t for t in left if t[1] == "team"]
    assert (a, "env", "e2e") not in left
    assert (b, "env", "prod") in left, "DeleteTags with a value must not delete a tag with another value"

    inst = {i["InstanceId"]: i for i in cloud.instances(InstanceIds=[a, b])}
    assert {"Key": "Name", "Value": "alpha"} in inst[a]["Tags"]
    assert not any(t["Key"] == "team" for t in inst[a]["Tags"] + inst[b]["Tags"])

    # Values with XML-special and non-ASCII characters survive the round trip.
    odd = 'a&b<c>"d\' ünïcødé ☃ \t x'
    cloud.ec2.create_tags(Resources=[a], Tags=[{"Key": "odd", "Value": odd}])
    assert tags({"Name": "key", "Values": ["odd"]}) == [(a, "odd", odd)]
    assert tags({"Name": "value", "Values": [odd]}) == [(a, "odd", odd)]
    assert [i["InstanceId"] for i in cloud.instances(Filters=[{"Name": "tag:odd", "Values": [odd]}])] == [a]

    with pytest.raises(ClientError) as exc:
        cloud.ec2.create_tags(Resources=["i-0123456789abcdef0"], Tags=[{"Key": "k", "Value": "v"}])
    assert error_code(exc.value) == "InvalidInstanceID.NotFound"


def test_request_rate_sanity(cloud):
    """Responses go out promptly (TCP_NODELAY, one write): sequential boto3 calls are not
    stuck at tens per second."""
    import time

    ec2 = cloud.client()
    ec2.describe_regions()
    start = time.monotonic()
    for _ in range(100):
        ec2.describe_regions()
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"100 DescribeRegions took {elapsed:.1f} s"
