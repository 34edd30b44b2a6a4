"""The instance metadata service, as a guest reaches it: `canopy clc`, `canopy cc --subnet`
and a simulated `canopy nc --metadata-listen 169.254.169.254:80`; each "guest" is a network
namespace holding its instance's private address, wired to the host by a veth pair. A
request is attributed to an instance by its source address only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import find_binary
from ha_cluster import OneReplicaCloud
from test_roles import ec2_client, wait_node, wait_zone

IMDS = "169.254.169.254"
SUBNET = "10.213.0.0/24"
WAIT = {"Delay": 1, "MaxAttempts": 60}


def skip_or_fail(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} under CI (.ci/run runs as root)")
    pytest.skip(why)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Guest:
    """A network namespace standing in for a guest with `address`."""

    def __init__(self, address: str):
        tag = uuid.uuid4().hex[:6]
        self.ns, self.host_if, self.guest_if = f"canopy-{tag}", f"cvh{tag}", f"cvg{tag}"
        self.address = address
        ip("netns", "add", self.ns)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.guest_if)
        ip("link", "set", self.guest_if, "netns", self.ns)
        ip("link", "set", self.host_if, "up")
        ip("route", "add", f"{address}/32", "dev", self.host_if)
        ip("-n", self.ns, "link", "set", "lo", "up")
        ip("-n", self.ns, "addr", "add", f"{address}/32", "dev", self.guest_if)
        ip("-n", self.ns, "link", "set", self.guest_if, "up")
        ip("-n", self.ns, "route", "add", f"{IMDS}/32", "dev", self.guest_if)

    def http(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict]:
        """One request to the metadata service from inside the namespace."""
        script = (
            "import json, sys, urllib.request, urllib.error\n"
            "m, url, h = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
            "req = urllib.request.Request(url, method=m, headers=h)\n"
            "try:\n"
            "    r = urllib.request.urlopen(req, timeout=10); code, body, hd = r.status, r.read(), dict(r.headers)\n"
            "except urllib.error.HTTPError as e:\n"
            "    code, body, hd = e.code, e.read(), dict(e.headers)\n"
            "print(json.dumps([code, body.decode(), hd]))\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "python3", "-c", script, method, f"http://{IMDS}{path}",
             json.dumps(headers or {})],
            check=True, capture_output=True, text=True, timeout=30,
        )
        code, body, hdrs = json.loads(out.stdout)
        return code, body, {k.lower(): v for k, v in hdrs.items()}

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        code, body, _ = self.http("GET", path, {"X-aws-ec2-metadata-token": token} if token else {})
        return code, body

    def token(self, ttl: int = 60) -> str:
        code, body, headers = self.http("PUT", "/latest/api/token",
                                        {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
        assert code == 200, body
        assert headers.get("x-aws-ec2-metadata-token-ttl-seconds") == str(ttl)
        return body

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)


@pytest.fixture
def cloud_with_imds(tmp_path, request):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("network namespaces need root and iproute2")
    # The service's address, as a host route target: on the host's loopback.
    added = subprocess.run(["ip", "addr", "add", f"{IMDS}/32", "dev", "lo"], capture_output=True)
    if added.returncode != 0 and b"File exists" not in added.stderr:
        skip_or_fail(f"cannot add {IMDS} to lo: {added.stderr.decode()}")
    cloud = OneReplicaCloud(str(find_binary()), tmp_path, "imds-1a", "hv-imds", stop_timeout=20,
                            cc_args=["--subnet", SUBNET],
                            nc_args=["--hypervisor", "sim", "--vcpus", "8", "--memory-mib", "16384",
                                     "--disk-gib", "100", "--metadata-listen", f"{IMDS}:80"])
    clc, cc, nc = cloud.procs()
    data = cloud.data
    guests: list[Guest] = []
    failures_before = request.session.testsfailed
    for p in (clc, cc, nc):
        p.start()
    try:
        rc = data / "canopyrc"
        ec2 = ec2_client(rc)
        wait_zone(ec2, "imds-1a")
        wait_node(rc, "hv-imds")
        yield {"ec2": ec2, "guests": guests}
    finally:
        for g in guests:
            g.close()
        for p in (nc, cc, clc):
            p.stop()
        subprocess.run(["ip", "addr", "del", f"{IMDS}/32", "dev", "lo"], capture_output=True)
        if request.session.testsfailed > failures_before:
            for p in (clc, cc, nc):
                print(f"----- {p.name} log -----\n{p.log()}")


def launch(ec2, **kwargs) -> dict:
    image = ec2.describe_images()["Images"][0]["ImageId"]
    [inst] = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, **kwargs)["Instances"]
    ec2.get_waiter("instance_running").wait(InstanceIds=[inst["InstanceId"]], WaiterConfig=WAIT)
    [inst] = ec2.describe_instances(InstanceIds=[inst["InstanceId"]])["Reservations"][0]["Instances"]
    return inst


def test_guests_read_their_own_metadata_v1_and_v2_and_nobody_elses(cloud_with_imds):
    ec2, guests = cloud_with_imds["ec2"], cloud_with_imds["guests"]
    ec2.create_key_pair(KeyName="imds-key", KeyType="ed25519")
    web = ec2.create_security_group(GroupName="web", Description="web")["GroupId"]
    a = launch(ec2, KeyName="imds-key", UserData="#cloud-config\nhostname: a\n", SecurityGroupIds=[web])
    b = launch(ec2, MetadataOptions={"HttpTokens": "required"})
    assert a["PrivateIpAddress"] != b["PrivateIpAddress"]
    ga, gb = Guest(a["PrivateIpAddress"]), Guest(b["PrivateIpAddress"])
    guests.extend([ga, gb])
    stranger = Guest("10.213.0.200")
    guests.append(stranger)

    # IMDSv1 from a's address: a's data.
    assert ga.get("/latest/meta-data/instance-id") == (200, a["InstanceId"])
    assert ga.get("/latest/meta-data/ami-id") == (200, a["ImageId"])
    assert ga.get("/latest/meta-data/instance-type") == (200, a["InstanceType"])
    assert ga.get("/latest/meta-data/local-ipv4") == (200, a["PrivateIpAddress"])
    assert ga.get("/latest/meta-data/placement/availability-zone") == (200, "imds-1a")
    assert ga.get("/latest/meta-data/security-groups") == (200, "web")
    assert ga.get("/latest/meta-data/public-keys/") == (200, "0=imds-key")
    code, openssh = ga.get("/latest/meta-data/public-keys/0/openssh-key")
    public = ec2.describe_key_pairs(KeyNames=["imds-key"], IncludePublicKey=True)["KeyPairs"][0]["PublicKey"]
    assert code == 200 and openssh.strip() == public.strip()
    code, hostname = ga.get("/latest/meta-data/hostname")
    assert code == 200 and hostname.startswith("ip-" + a["PrivateIpAddress"].replace(".", "-"))
    assert ga.get("/latest/user-data") == (200, "#cloud-config\nhostname: a\n")
    code, doc = ga.get("/latest/dynamic/instance-identity/document")
    doc = json.loads(doc)
    assert (doc["instanceId"], doc["privateIp"], doc["availabilityZone"]) == \
        (a["InstanceId"], a["PrivateIpAddress"], "imds-1a")
    assert doc["accountId"] == ec2.describe_security_groups(GroupIds=[web])["SecurityGroups"][0]["OwnerId"]
    code, listing = ga.get("/latest/meta-data/")
    assert code == 200 and {"instance-id", "local-ipv4", "public-keys/"} <= set(listing.split())

    # IMDSv2: a token for a; a wrong or another instance's token is refused.
    token = ga.token()
    assert ga.get("/latest/meta-data/instance-id", token) == (200, a["InstanceId"])
    assert ga.get("/latest/meta-data/instance-id", token[:-2] + "xx")[0] == 401
    assert ga.get("/latest/meta-data/instance-id", "garbage")[0] == 401
    assert gb.get("/latest/meta-data/instance-id", token)[0] == 401
    code, _, _ = ga.http("PUT", "/latest/api/token", {})
    assert code == 400, "a token request needs its TTL"

    # b requires tokens: v1 refused, v2 served, its own data only.
    assert gb.get("/latest/meta-data/instance-id")[0] == 401
    assert gb.get("/latest/meta-data/instance-id", gb.token()) == (200, b["InstanceId"])
    assert gb.get("/latest/user-data", gb.token())[0] == 404, "b has no user data"

    # An address that is no instance's: nothing.
    assert stranger.get("/latest/meta-data/instance-id")[0] == 404
    assert stranger.http("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})[0] == 404

    # An Elastic IP shows as public-ipv4 once associated.
    assert "public-ipv4" not in ga.get("/latest/meta-data/")[1].split()
    eip = ec2.allocate_address(Domain="vpc")
    ec2.associate_address(AllocationId=eip["AllocationId"], InstanceId=a["InstanceId"])
    deadline = time.time() + 30
    while ga.get("/latest/meta-data/public-ipv4") != (200, eip["PublicIp"]):
        assert time.time() < deadline, "the node did not learn the instance's Elastic IP"
        time.sleep(0.5)

    # Turning the options: v1 allowed again for b, and the service off for a.
    ec2.modify_instance_metadata_options(InstanceId=b["InstanceId"], HttpTokens="optional")
    ec2.modify_instance_metadata_options(InstanceId=a["InstanceId"], HttpEndpoint="disabled")
    reservations = ec2.describe_instances(InstanceIds=[a["InstanceId"], b["InstanceId"]])["Reservations"]
    described = {i["InstanceId"]: i for r in reservations for i in r["Instances"]}
    assert described[b["InstanceId"]]["MetadataOptions"]["HttpTokens"] == "optional"
    assert described[a["InstanceId"]]["MetadataOptions"]["HttpEndpoint"] == "disabled"
    deadline = time.time() + 30
    while gb.get("/latest/meta-data/instance-id")[0] != 200 or ga.get("/latest/meta-data/instance-id")[0] != 404:
        assert time.time() < deadline, "the node did not follow the new metadata options"
        time.sleep(0.5)
