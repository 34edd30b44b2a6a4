"""Each role as its own process: `canopy clc`, `canopy cc` and `canopy nc` on loopback,
wired only by their flags, driven by boto3. Restarting the CC or the CLC must lose nothing."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from conftest import find_binary, parse_canopyrc
from ha_cluster import OneReplicaCloud

WAIT = {"Delay": 1, "MaxAttempts": 60}


@pytest.fixture
def roles(tmp_path, request):
    cloud = OneReplicaCloud(str(find_binary()), tmp_path, "roles-1a", "hv-1", stop_timeout=20,
                            nc_args=["--hypervisor", "sim", "--vcpus", "4", "--memory-mib", "8192",
                                     "--disk-gib", "100"])
    clc, cc, nc = cloud.procs()
    data = cloud.data
    # Start them bottom-up, the reverse of what an operator would do: each must wait for
    # the tier above it on its own.
    procs = {"nc": nc.start(), "cc": cc.start(), "clc": clc.start()}
    procs["rc"] = data / "canopyrc"
    failures_before = request.session.testsfailed
    try:
        yield procs
    finally:
        for p in (nc, cc, clc):
            p.stop()
        if request.session.testsfailed > failures_before:
            for p in (clc, cc, nc):
                print(f"----- {p.name} log -----\n{p.log()}")


def ec2_client(rc_path: Path):
    deadline = time.time() + 60
    while not rc_path.exists():
        assert time.time() < deadline, "canopy clc never wrote canopyrc"
        time.sleep(0.1)
    rc = parse_canopyrc(rc_path.read_text())
    return boto3.client(
        "ec2",
        endpoint_url=rc["AWS_ENDPOINT_URL_EC2"],
        region_name=rc["AWS_DEFAULT_REGION"],
        aws_access_key_id=rc["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=rc["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"mode": "standard", "max_attempts": 3}),
    )


def wait_zone(ec2, zone: str) -> None:
    deadline = time.time() + 60
    while True:
        zones = ec2.describe_availability_zones()["AvailabilityZones"]
        if any(z["ZoneName"] == zone and z["State"] == "available" for z in zones):
            return
        assert time.time() < deadline, f"zone {zone} never became available: {zones}"
        time.sleep(0.2)


def wait_node(rc_path: Path, node_id: str) -> None:
    """Until the admin API shows the node healthy: a zone is available as soon as its CC
    heartbeats, which can be before its first node has registered."""
    rc = parse_canopyrc(rc_path.read_text())
    req = urllib.request.Request(rc["CANOPY_ADMIN_ENDPOINT"] + "/v1/nodes",
                                 headers={"Authorization": "Bearer " + rc["CANOPY_ADMIN_TOKEN"]})
    deadline = time.time() + 60
    while True:
        with urllib.request.urlopen(req, timeout=10) as resp:
            nodes = json.load(resp)
        if any(n["node_id"] == node_id and n["healthy"] for n in nodes):
            return
        assert time.time() < deadline, f"node {node_id} never showed up healthy: {nodes}"
        time.sleep(0.2)


def state_of(ec2, iid: str) -> str:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]


def test_separate_processes_run_an_instance_and_survive_restarts(roles):
    ec2 = ec2_client(roles["rc"])
    wait_zone(ec2, "roles-1a")
    wait_node(roles["rc"], "hv-1")
    image = ec2.describe_images()["Images"][0]["ImageId"]
    resp = ec2.run_instances(ImageId=image, InstanceType="t2.micro", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": "roles-1a"})
    iid = resp["Instances"][0]["InstanceId"]
    ec2.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig=WAIT)
    out = ec2.get_console_output(InstanceId=iid)
    assert iid in out.get("Output", "")

    # The node offers what its flags say; a launch beyond it is refused up front.
    with pytest.raises(ec2.exceptions.ClientError) as e:
        ec2.run_instances(ImageId=image, InstanceType="m5.xlarge", MinCount=2, MaxCount=2)
    assert e.value.response["Error"]["Code"] == "InsufficientInstanceCapacity"

    # A restarted CC relearns where the instance lives (from the node and the CLC's hint):
    # the instance keeps running, and a stop still reaches its node.
    roles["cc"].stop()
    roles["cc"].start()
    time.sleep(3)
    assert state_of(ec2, iid) == "running"
    ec2.stop_instances(InstanceIds=[iid])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[iid], WaiterConfig=WAIT)

    # A CLC killed outright keeps every acknowledged change: the instance is still there,
    # still stopped, and the cloud drives it again once the CLC is back.
    roles["clc"].stop(signal.SIGKILL)
    roles["clc"].start()
    ec2 = ec2_client(roles["rc"])
    wait_zone(ec2, "roles-1a")
    assert state_of(ec2, iid) == "stopped"
    ec2.start_instances(InstanceIds=[iid])
    ec2.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig=WAIT)
    ec2.terminate_instances(InstanceIds=[iid])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=[iid], WaiterConfig=WAIT)
