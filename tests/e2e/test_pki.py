"""Components that authenticate each other, as real processes on loopback: a node joins with a
join token (`canopy admin create-join-token`, `canopy nc --join-token`) and runs instances; a
token is spent once; a rogue node with another CA's certificate never registers; a revoked
node (`canopy admin revoke`) is cut off and cannot come back, while the cloud keeps working
on its other node."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import boto3
import pytest

from conftest import Pki, find_binary, free_port, parse_canopyrc
from ha_cluster import OneReplicaCloud, Proc

ZONE = "tls-1a"
WAIT = {"Delay": 1, "MaxAttempts": 60}
SIM = ["--hypervisor", "sim", "--vcpus", "4", "--memory-mib", "8192", "--disk-gib", "100"]


class TlsCloud:
    def __init__(self, tmp: Path):
        self.binary = str(find_binary())
        self.tmp = tmp
        cc_config = tmp / "cc.toml"
        # Nodes that stop heartbeating turn unhealthy fast.
        cc_config.write_text("node_timeout_secs = 3.0\n")
        self.cloud = OneReplicaCloud(self.binary, tmp, ZONE, "hv-good", stop_timeout=20,
                                     cc_args=["--config", str(cc_config)], nc_args=SIM)
        self.extra: list[Proc] = []

    @property
    def rc(self) -> dict[str, str]:
        return parse_canopyrc(self.cloud.rc_path.read_text())

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CANOPY_"))}
        env.update(self.rc)
        return subprocess.run([self.binary, "admin", *args], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    def admin_json(self, *args: str):
        done = self.admin("--json", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def nodes(self) -> dict[str, bool]:
        return {n["node_id"]: n["healthy"] for n in self.admin_json("nodes")}

    def wait_nodes(self, ok, what: str, timeout: float = 30.0) -> dict[str, bool]:
        deadline = time.time() + timeout
        while True:
            nodes = self.nodes()
            if ok(nodes):
                return nodes
            assert time.time() < deadline, f"{what}: nodes are {nodes}"
            time.sleep(0.3)

    def node(self, name: str, *extra: str) -> Proc:
        """A `canopy nc` of this zone with its own (empty) TLS directory, not started."""
        proc = Proc(name, [self.binary, "nc", "--node-id", name, "--cc", self.cloud.cc_endpoint,
                           "--listen", f"127.0.0.1:{free_port()}", "--tls-dir", str(self.tmp / f"{name}-tls"),
                           *SIM, *extra], self.tmp, stop_timeout=20)
        self.extra.append(proc)
        return proc

    def ec2(self):
        rc = self.rc
        return boto3.session.Session().client(
            "ec2", endpoint_url=rc["AWS_ENDPOINT_URL_EC2"], region_name=rc["AWS_DEFAULT_REGION"],
            aws_access_key_id=rc["AWS_ACCESS_KEY_ID"], aws_secret_access_key=rc["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def tls_cloud(tmp_path, request):
    c = TlsCloud(tmp_path)
    failures_before = request.session.testsfailed
    for p in c.cloud.procs():
        p.start()
    try:
        deadline = time.time() + 60
        while not c.cloud.rc_path.exists():
            assert c.cloud.clc.running, c.cloud.clc.log_tail(40)
            assert time.time() < deadline, "the CLC wrote no canopyrc"
            time.sleep(0.2)
        c.wait_nodes(lambda n: n.get("hv-good"), "hv-good never came up healthy")
        yield c
    finally:
        for p in [*c.extra, *c.cloud.procs()]:
            p.stop()
        if request.session.testsfailed > failures_before:
            for p in [*c.extra, *c.cloud.procs()]:
                print(f"----- {p.name} log (tail) -----\n{p.log_tail(40)}")


def run_on(ec2, node: str) -> str:
    image = ec2.describe_images()["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=image, InstanceType="t2.micro", MinCount=1, MaxCount=1,
                            Placement={"AvailabilityZone": ZONE})["Instances"][0]["InstanceId"]
    ec2.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig=WAIT)
    return iid


def test_a_node_joins_with_a_token_once_and_a_revoked_node_is_cut_off(tls_cloud):
    c = tls_cloud
    made = c.admin_json("create-join-token", "--zone", ZONE, "--ttl", "600", "--description", "rack 4")
    token = made["token"]
    assert token.startswith("canopy1.") and made["zone"] == ZONE

    joined = c.node("hv-join", "--join-token", token).start()
    c.wait_nodes(lambda n: n.get("hv-join"), "the joined node never came up healthy")
    tls = c.tmp / "hv-join-tls"
    assert {p.name for p in tls.iterdir()} >= {"ca.crt", "tls.crt", "tls.key"}
    assert (tls / "tls.key").stat().st_mode & 0o077 == 0, "the node's key is readable by others"
    certs = [x for x in c.admin_json("certificates") if x["name"] == "hv-join"]
    assert len(certs) == 1 and certs[0]["role"] == "node" and certs[0]["zone"] == ZONE and not certs[0]["revoked_at"]
    spent = [t for t in c.admin_json("join-tokens") if t["token_id"] == made["token_id"]]
    assert spent[0]["used_by"] == "hv-join", spent

    # The token is spent: another node cannot use it.
    again = c.node("hv-again", "--join-token", token).start()
    deadline = time.time() + 30
    while again.running:
        assert time.time() < deadline, "a node joined with a spent token"
        time.sleep(0.2)
    assert "already used" in again.log(), again.log_tail(10)
    assert not (c.tmp / "hv-again-tls" / "tls.crt").exists()

    # A rogue node with a certificate from another CA never registers.
    rogue_dir = Pki(c.binary, c.tmp / "rogue-pki").issue("node", "hv-rogue")
    rogue = Proc("hv-rogue", [c.binary, "nc", "--node-id", "hv-rogue", "--cc", c.cloud.cc_endpoint,
                              "--listen", f"127.0.0.1:{free_port()}", "--tls-dir", rogue_dir, *SIM],
                 c.tmp, stop_timeout=20)
    c.extra.append(rogue)
    rogue.start()

    # Revoke the joined node while it runs an instance.
    ec2 = c.ec2()
    c.wait_nodes(lambda n: n.get("hv-join") and n.get("hv-good"), "both nodes healthy")
    revoked = c.admin_json("revoke", "--node", "hv-join")["revoked"]
    assert revoked == [certs[0]["serial"]]
    c.wait_nodes(lambda n: n.get("hv-join") is False, "the revoked node stayed healthy")
    assert joined.running, "revocation cuts the node off; it does not crash it"
    assert "hv-rogue" not in c.nodes()
    assert "TLS handshake failed" in c.cloud.cc.log(), c.cloud.cc.log_tail(20)

    # The cloud keeps working on its good node.
    iid = run_on(ec2, "hv-good")
    placed = [i for i in c.admin_json("instances") if i["instance_id"] == iid]
    assert placed[0]["node_id"] == "hv-good", placed

    # Restarted, the revoked node cannot come back: its handshakes are refused.
    joined.stop()
    joined.start()
    time.sleep(4)
    assert c.nodes().get("hv-join") is False
    assert "hv-rogue" not in c.nodes()
    certs = {x["serial"]: x for x in c.admin_json("certificates")}
    assert certs[revoked[0]]["revoked_at"]


def test_components_refuse_to_start_without_certificates(tmp_path):
    binary = str(find_binary())
    for role in (["clc", "--data-dir", str(tmp_path / "clc")], ["cc", "--zone", ZONE],
                 ["nc", "--node-id", "hv-x", "--hypervisor", "sim"]):
        done = subprocess.run([binary, *role], capture_output=True, text=True, timeout=30,
                              env={k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")})
        assert done.returncode != 0, f"canopy {role[0]} started without a TLS directory"
        assert "needs a TLS directory" in done.stderr, done.stderr
    # An empty TLS directory and no join token: the node says how to get a certificate.
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([binary, "nc", "--node-id", "hv-x", "--hypervisor", "sim", "--tls-dir", str(empty)],
                          capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")})
    assert done.returncode != 0 and "join token" in done.stderr, done.stderr


def test_a_new_cloud_of_one_makes_its_ca_at_first_start(tmp_path):
    binary = str(find_binary())
    tls = tmp_path / "tls"
    ports = [free_port() for _ in range(4)]
    clc = Proc("clc", [binary, "clc", "--data-dir", str(tmp_path / "clc"), "--tls-dir", str(tls),
                       "--ec2-listen", f"127.0.0.1:{ports[0]}", "--admin-listen", f"127.0.0.1:{ports[1]}",
                       "--grpc-listen", f"127.0.0.1:{ports[2]}", "--raft-listen", f"127.0.0.1:{ports[3]}"],
               tmp_path, stop_timeout=20)
    clc.start()
    try:
        deadline = time.time() + 60
        while not (tmp_path / "clc" / "canopyrc").exists():
            assert clc.running and time.time() < deadline, clc.log_tail(30)
            time.sleep(0.2)
        assert {p.name for p in tls.iterdir()} >= {"ca.crt", "ca.key", "tls.crt", "tls.key"}
        assert (tls / "ca.key").stat().st_mode & 0o077 == 0
        assert "created the cloud CA" in clc.log()
        # It signs join tokens with it: the token pins that CA.
        rc = parse_canopyrc((tmp_path / "clc" / "canopyrc").read_text())
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CANOPY_"))}, **rc}
        made = subprocess.run([binary, "admin", "--json", "create-join-token"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        fingerprint = subprocess.run([binary, "ca", "fingerprint", "--dir", str(tls)], capture_output=True,
                                     text=True, timeout=30).stdout.strip()
        assert json.loads(made.stdout)["token"].split(".")[1] == fingerprint
        # A second start keeps the CA.
        before = (tls / "ca.crt").read_text()
        clc.stop()
        clc.start()
        time.sleep(1)
        assert (tls / "ca.crt").read_text() == before
    finally:
        clc.stop()
