"""Instance lifecycle through boto3: idempotent launches, waiters, filters, pagination,
stop/start/reboot, console output, termination, instance status."""

import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import INSTANCE_ID_RE, RESERVATION_ID_RE, error_code, eventually, http_status

STATES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


def state_of(cloud, instance_id):
    res = cloud.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    assert len(res) == 1 and len(res[0]["Instances"]) == 1, res
    return res[0]["Instances"][0]["State"]


def test_run_instances_client_token_is_idempotent(cloud, launcher):
    token = f"e2e-{uuid.uuid4()}"
    first = launcher.run(2, ClientToken=token)
    ids = sorted(i["InstanceId"] for i in first["Instances"])
    assert len(ids) == 2
    assert RESERVATION_ID_RE.match(first["ReservationId"]), first["ReservationId"]
    assert first["OwnerId"].isdigit() and len(first["OwnerId"]) == 12, first["OwnerId"]
    for inst in first["Instances"]:
        assert inst["ImageId"] == cloud.image_id
        assert inst["InstanceType"] == "t2.micro"
        assert inst["State"]["Name"] in ("pending", "running")
        assert inst["State"]["Code"] == STATES[inst["State"]["Name"]]
        assert inst["ClientToken"] == token
    assert sorted(i["AmiLaunchIndex"] for i in first["Instances"]) == [0, 1]

    again = launcher.run(2, ClientToken=token)
    assert again["ReservationId"] == first["ReservationId"]
    assert sorted(i["InstanceId"] for i in again["Instances"]) == ids

    mine = launcher.mine()
    assert sorted(i["InstanceId"] for i in mine) == ids, "the retried launch created instances"
    by_token = cloud.instances(Filters=[{"Name": "client-token", "Values": [token]}])
    assert sorted(i["InstanceId"] for i in by_token) == ids

    with pytest.raises(ClientError) as exc:
        launcher.run(1, ClientToken=token)
    assert error_code(exc.value) == "IdempotentParameterMismatch"
    assert http_status(exc.value) == 400
    with pytest.raises(ClientError) as exc:
        launcher.run(2, ClientToken=token, InstanceType="t2.nano")
    assert error_code(exc.value) == "IdempotentParameterMismatch"
    assert sorted(i["InstanceId"] for i in launcher.mine()) == ids


def test_instances_reach_running(cloud, launcher):
    resp = launcher.run(2)
    ids = [i["InstanceId"] for i in resp["Instances"]]
    for i in ids:
        assert INSTANCE_ID_RE.match(i), i
    assert len(set(ids)) == 2
    cloud.wait("instance_running", InstanceIds=ids)
    described = cloud.instances(InstanceIds=ids)
    assert sorted(i["InstanceId"] for i in described) == sorted(ids)
    for inst in described:
        assert inst["State"] == {"Code": 16, "Name": "running"}
        assert inst["Placement"]["AvailabilityZone"] in cloud.zones
        assert inst["LaunchTime"] is not None
        assert {"Key": launcher.TAG_KEY, "Value": launcher.tag} in inst["Tags"]
    # Both instances of one launch share one reservation.
    res = cloud.ec2.describe_instances(InstanceIds=ids)["Reservations"]
    assert [r["ReservationId"] for r in res] == [resp["ReservationId"]]
    assert res[0]["OwnerId"] == resp["OwnerId"]


def test_running_instances_have_unique_private_addresses_from_their_zones_subnet(cloud, launcher):
    import ipaddress
    # `canopy dev` gives its zones 172.16.0.0/16, 172.17.0.0/16, ... in order.
    subnets = {z: ipaddress.ip_network(f"172.{16 + n}.0.0/16") for n, z in enumerate(cloud.zones)}
    ids = launcher.run_ids(3, Placement={"AvailabilityZone": cloud.zones[-1]})
    ids += launcher.run_ids(2, Placement={"AvailabilityZone": cloud.zones[0]})
    cloud.wait("instance_running", InstanceIds=ids)
    described = cloud.instances(InstanceIds=ids)
    addresses = [inst["PrivateIpAddress"] for inst in described]
    assert len(set(addresses)) == len(ids), addresses
    for inst in described:
        assert ipaddress.ip_address(inst["PrivateIpAddress"]) in subnets[inst["Placement"]["AvailabilityZone"]]
    one = described[0]
    found = cloud.instances(Filters=[launcher.filter,
                                     {"Name": "private-ip-address", "Values": [one["PrivateIpAddress"]]}])
    assert [i["InstanceId"] for i in found] == [one["InstanceId"]]
    # A terminated instance no longer shows an address.
    cloud.ec2.terminate_instances(InstanceIds=[one["InstanceId"]])
    cloud.wait("instance_terminated", InstanceIds=[one["InstanceId"]])
    assert "PrivateIpAddress" not in cloud.instances(InstanceIds=[one["InstanceId"]])[0]


def test_describe_instances_filters(cloud, launcher):
    micro_resp = launcher.run(
        2, InstanceType="t2.micro", Placement={"AvailabilityZone": "canopy-1a"},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "web"}]}],
    )
    micro = [i["InstanceId"] for i in micro_resp["Instances"]]
    nano = launcher.run_ids(
        1, InstanceType="t2.nano", Placement={"AvailabilityZone": "canopy-1b"},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "db"}]}],
    )
    everything = sorted(micro + nano)
    cloud.wait("instance_running", InstanceIds=everything)

    def ids(*filters, **kw):
        return sorted(i["InstanceId"] for i in cloud.instances(Filters=[launcher.filter, *filters], **kw))

    assert ids() == everything
    assert ids({"Name": "instance-state-name", "Values": ["running"]}) == everything
    assert ids({"Name": "instance-state-name", "Values": ["stopped", "terminated"]}) == []
    assert ids({"Name": "instance-state-code", "Values": ["16"]}) == everything
    assert ids({"Name": "instance-id", "Values": [micro[0]]}) == [micro[0]]
    assert ids({"Name": "instance-id", "Values": [micro[0], nano[0]]}) == sorted([micro[0], nano[0]])
    assert ids({"Name": "availability-zone", "Values": ["canopy-1a"]}) == sorted(micro)
    assert ids({"Name": "availability-zone", "Values": ["canopy-1b"]}) == nano
    assert ids({"Name": "instance-type", "Values": ["t2.nano"]}) == nano
    assert ids({"Name": "instance-type", "Values": ["t2.micro", "t2.nano"]}) == everything
    assert ids({"Name": "image-id", "Values": [cloud.image_id]}) == everything
    assert ids({"Name": "image-id", "Values": ["ami-0123456789abcdef0"]}) == []
    assert ids({"Name": "reservation-id", "Values": [micro_resp["ReservationId"]]}) == sorted(micro)
    assert ids({"Name": "owner-id", "Values": [micro_resp["OwnerId"]]}) == everything
    assert ids({"Name": "key-name", "Values": ["no-such-key"]}) == []
    assert ids({"Name": "tag:role", "Values": ["web"]}) == sorted(micro)
    assert ids({"Name": "tag:role", "Values": ["web", "db"]}) == everything
    assert ids({"Name": "tag:role", "Values": ["nope"]}) == []
    assert ids({"Name": "tag-key", "Values": ["role"]}) == everything
    assert ids({"Name": "tag-value", "Values": ["db"]}) == nano
    # Filters are ANDed; values within one filter ORed.
    assert ids({"Name": "tag:role", "Values": ["web"]}, {"Name": "instance-type", "Values": ["t2.nano"]}) == []
    # A filter together with InstanceIds narrows those ids.
    assert ids({"Name": "instance-type", "Values": ["t2.micro"]}, InstanceIds=[micro[0], nano[0]]) == [micro[0]]
    # The tag filter alone (without our unique tag) finds ours among everyone's.
    all_web = {i["InstanceId"] for i in cloud.instances(Filters=[{"Name": "tag:role", "Values": ["web"]}])}
    assert set(micro) <= all_web and not set(nano) & all_web

    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_instances(Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    assert error_code(exc.value) == "InvalidParameterValue"
    assert http_status(exc.value) == 400


def test_describe_instances_pagination(cloud, launcher):
    ids = sorted(id_ for _ in range(7) for id_ in launcher.run_ids(1))
    assert len(set(ids)) == 7

    for filters in ([launcher.filter], []):
        pages = list(cloud.ec2.get_paginator("describe_instances").paginate(
            Filters=filters, PaginationConfig={"PageSize": 5}))
        seen = [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]
        assert len(pages) > 1, f"expected several pages, got {len(pages)}"
        for p in pages:
            assert sum(len(r["Instances"]) for r in p["Reservations"]) <= 5
        assert len(seen) == len(set(seen)), "an instance appeared on two pages"
        assert [i for i in seen if i in ids] and sorted(i for i in seen if i in ids) == ids
        assert "NextToken" not in pages[-1] or not pages[-1]["NextToken"]

    # All of the account's instances, unpaginated, match the paginated set.
    whole = cloud.ec2.describe_instances()
    assert "NextToken" not in whole or not whole["NextToken"]
    unpaged = sorted(i["InstanceId"] for r in whole["Reservations"] for i in r["Instances"])
    assert unpaged == sorted(seen)

    for bad in (1, 4):
        with pytest.raises(ClientError) as exc:
            cloud.ec2.describe_instances(MaxResults=bad)
        assert error_code(exc.value) == "InvalidParameterValue", bad
    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_instances(MaxResults=1001)
    assert error_code(exc.value) == "InvalidParameterValue"
    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_instances(InstanceIds=ids[:2], MaxResults=5)
    assert error_code(exc.value) == "InvalidParameterCombination"
    with pytest.raises(ClientError) as exc:
        cloud.ec2.describe_instances(MaxResults=5, NextToken="garbage-token")
    assert error_code(exc.value) in ("InvalidParameterValue", "InvalidNextToken"), exc.value.response["Error"]


def test_stop_start_reboot(cloud, launcher):
    (iid,) = launcher.run_ids(1)
    cloud.wait("instance_running", InstanceIds=[iid])

    # Starting a running instance is a no-op that succeeds.
    resp = cloud.ec2.start_instances(InstanceIds=[iid])
    (change,) = resp["StartingInstances"]
    assert change["InstanceId"] == iid
    assert change["PreviousState"] == {"Code": 16, "Name": "running"}
    assert change["CurrentState"] == {"Code": 16, "Name": "running"}

    resp = cloud.ec2.stop_instances(InstanceIds=[iid])
    (change,) = resp["StoppingInstances"]
    assert change["InstanceId"] == iid
    assert change["PreviousState"] == {"Code": 16, "Name": "running"}
    assert change["CurrentState"]["Name"] in ("stopping", "stopped")
    assert change["CurrentState"]["Code"] == STATES[change["CurrentState"]["Name"]]
    cloud.wait("instance_stopped", InstanceIds=[iid])
    assert state_of(cloud, iid) == {"Code": 80, "Name": "stopped"}

    # Stopping a stopped instance succeeds and changes nothing.
    (change,) = cloud.ec2.stop_instances(InstanceIds=[iid])["StoppingInstances"]
    assert change["PreviousState"]["Name"] == "stopped" and change["CurrentState"]["Name"] == "stopped"

    resp = cloud.ec2.start_instances(InstanceIds=[iid])
    (change,) = resp["StartingInstances"]
    assert change["PreviousState"] == {"Code": 80, "Name": "stopped"}
    assert change["CurrentState"]["Name"] in ("pending", "running")
    assert change["CurrentState"]["Code"] == STATES[change["CurrentState"]["Name"]]
    cloud.wait("instance_running", InstanceIds=[iid])
    assert state_of(cloud, iid) == {"Code": 16, "Name": "running"}

    resp = cloud.ec2.reboot_instances(InstanceIds=[iid])
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 200
    cloud.wait("instance_running", InstanceIds=[iid])

    with pytest.raises(ClientError) as exc:
        cloud.ec2.reboot_instances(InstanceIds=["i-0000000000000dead"])
    assert error_code(exc.value) == "InvalidInstanceID.NotFound"


def test_console_output(cloud, launcher):
    (iid,) = launcher.run_ids(1)
    cloud.wait("instance_running", InstanceIds=[iid])
    resp = cloud.ec2.get_console_output(InstanceId=iid)
    assert resp["InstanceId"] == iid
    assert f"canopy-sim: booting instance {iid}" in resp["Output"], resp["Output"]
    assert resp["Timestamp"] is not None

    with pytest.raises(ClientError) as exc:
        cloud.ec2.get_console_output(InstanceId="i-0000000000000dead")
    assert error_code(exc.value) == "InvalidInstanceID.NotFound"


def test_terminate(cloud, launcher):
    ids = sorted(launcher.run_ids(2))
    cloud.wait("instance_running", InstanceIds=ids)
    resp = cloud.ec2.terminate_instances(InstanceIds=ids)
    changes = sorted(resp["TerminatingInstances"], key=lambda c: c["InstanceId"])
    assert [c["InstanceId"] for c in changes] == ids
    for c in changes:
        assert c["PreviousState"] == {"Code": 16, "Name": "running"}
        assert c["CurrentState"]["Name"] in ("shutting-down", "terminated")
        assert c["CurrentState"]["Code"] == STATES[c["CurrentState"]["Name"]]
    cloud.wait("instance_terminated", InstanceIds=ids)

    described = cloud.instances(InstanceIds=ids)
    assert sorted(i["InstanceId"] for i in described) == ids, "terminated instances must stay visible"
    for inst in described:
        assert inst["State"] == {"Code": 48, "Name": "terminated"}
    assert sorted(i["InstanceId"] for i in launcher.mine()) == ids
    listed = cloud.instances(Filters=[launcher.filter, {"Name": "instance-state-name", "Values": ["terminated"]}])
    assert sorted(i["InstanceId"] for i in listed) == ids

    # Terminating again is idempotent.
    (again, _) = cloud.ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
    assert again["PreviousState"]["Name"] == "terminated" and again["CurrentState"]["Name"] == "terminated"

    # A terminated instance cannot be started.
    with pytest.raises(ClientError) as exc:
        cloud.ec2.start_instances(InstanceIds=[ids[0]])
    assert error_code(exc.value) == "IncorrectInstanceState"


def test_describe_instance_status(cloud, launcher):
    running, stopped = launcher.run_ids(2)
    cloud.wait("instance_running", InstanceIds=[running, stopped])
    cloud.ec2.stop_instances(InstanceIds=[stopped])
    cloud.wait("instance_stopped", InstanceIds=[stopped])
    cloud.wait("instance_status_ok", InstanceIds=[running])

    statuses = cloud.ec2.describe_instance_status(InstanceIds=[running, stopped])["InstanceStatuses"]
    assert [s["InstanceId"] for s in statuses] == [running], "without IncludeAllInstances only running ones"
    (st,) = statuses
    assert st["InstanceState"] == {"Code": 16, "Name": "running"}
    assert st["InstanceStatus"]["Status"] == "ok"
    assert st["SystemStatus"]["Status"] == "ok"
    assert st["AvailabilityZone"] in cloud.zones

    every = cloud.ec2.describe_instance_status(InstanceIds=[running, stopped], IncludeAllInstances=True)
    by_id = {s["InstanceId"]: s for s in every["InstanceStatuses"]}
    assert set(by_id) == {running, stopped}
    assert by_id[stopped]["InstanceState"] == {"Code": 80, "Name": "stopped"}
    assert by_id[running]["InstanceState"]["Name"] == "running"

    # Without ids: the running one is among all of the account's statuses.
    all_ids = {s["InstanceId"] for p in cloud.ec2.get_paginator("describe_instance_status").paginate()
               for s in p["InstanceStatuses"]}
    assert running in all_ids and stopped not in all_ids


def test_concurrent_launches_with_one_client_token(cloud, launcher):
    """Retries of one RunInstances may race each other: the token must still yield one reservation."""
    import concurrent.futures

    token = f"e2e-race-{uuid.uuid4()}"
    clients = [cloud.client() for _ in range(6)]

    def go(ec2):
        return ec2.run_instances(
            ImageId=cloud.image_id, InstanceType="t2.micro", MinCount=1, MaxCount=1, ClientToken=token,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": launcher.TAG_KEY, "Value": launcher.tag}]}],
        )

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(go, clients))
    assert len({r["ReservationId"] for r in results}) == 1
    assert len({r["Instances"][0]["InstanceId"] for r in results}) == 1
    assert len(launcher.mine()) == 1


def test_empty_results_keep_their_lists(cloud):
    """Empty sets are emitted (<reservationSet/>), so the keys exist for client code."""
    resp = cloud.ec2.describe_instances(Filters=[{"Name": "tag:no-such-tag", "Values": ["x"]}])
    assert resp["Reservations"] == []
    resp = cloud.ec2.describe_instance_status(Filters=[{"Name": "availability-zone", "Values": ["nowhere-1a"]}])
    assert resp["InstanceStatuses"] == []
    resp = cloud.ec2.describe_tags(Filters=[{"Name": "key", "Values": ["no-such-key-anywhere"]}])
    assert resp["Tags"] == []
    resp = cloud.ec2.describe_images(Owners=["amazon"])
    assert resp["Images"] == []


def test_partial_launch_fills_a_zone_and_termination_frees_it(new_cloud):
    """MinCount..MaxCount launches as many as fit (at least MinCount); capacity comes back on terminate."""
    import json

    c = new_cloud()
    c.start()
    once = c.client(retries={"mode": "standard", "max_attempts": 1})
    resp = once.run_instances(ImageId=c.image_id, InstanceType="t2.micro", MinCount=1, MaxCount=1000)
    ids = [i["InstanceId"] for i in resp["Instances"]]
    assert 1 <= len(ids) < 1000

    with pytest.raises(ClientError) as exc:
        once.run_instances(ImageId=c.image_id, InstanceType="t2.micro", MinCount=1, MaxCount=1)
    assert error_code(exc.value) == "InsufficientInstanceCapacity"

    c.wait("instance_running", InstanceIds=ids)
    # The admin view of the node follows its heartbeats (about 1 s).
    (node,) = eventually(lambda: json.loads(c.admin_run("--json", "nodes").stdout),
                         lambda nodes: nodes[0]["allocated"]["vcpus"] == len(ids))
    assert len(ids) <= node["capacity"]["vcpus"]
    assert node["allocated"]["vcpus"] == len(ids), node
    assert node["instance_count"] == len(ids), node
    once.terminate_instances(InstanceIds=ids)
    c.wait("instance_terminated", InstanceIds=ids)
    again = once.run_instances(ImageId=c.image_id, InstanceType="t2.micro", MinCount=2, MaxCount=2)
    assert len(again["Instances"]) == 2
    assert c.stop() == 0
