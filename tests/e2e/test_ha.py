"""The replicated cloud controller as real processes: three `canopy clc` replicas, one
`canopy cc`, one simulated `canopy nc`, all on loopback. Clients rotate over every replica
(followers forward to the leader) and replicas are SIGKILLed under load.

What must hold: every acknowledged RunInstances exists exactly once, a ClientToken retried
across a failover never makes a second instance, the group keeps accepting writes while a
majority is up, a restarted replica catches up, and a full CLC outage neither loses state
nor disturbs the instances the node is running.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict

import pytest
from botocore.config import Config

from conftest import find_binary
from ha_cluster import HaCluster, Proc, Replica

ZONE = "ha-1a"
# The launch loop retries by hand (same token, next replica), so the SDK must not
# (`max_attempts` counts retries, `total_max_attempts` counts sends).
LOOP_CONFIG = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10)
# What a client may see while a replica dies or restarts, and must simply retry: transport
# failures (the replica it called is gone) and 503 ServiceUnavailable (no leader yet, or the
# leader died holding the request). Anything else is a bug.
TRANSIENT = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
             "ServiceUnavailable"}


# --------------------------------------------------------------------------------------
# the cluster (processes and readiness: ha_cluster.py)


@pytest.fixture
def ha(tmp_path, request):
    """Three CLC replicas, a CC for zone ha-1a and a simulated node, all ready."""
    cluster = HaCluster(str(find_binary()), tmp_path, ZONE)
    failures_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close(failed=request.session.testsfailed > failures_before or not cluster.replicas[0].rc)


# --------------------------------------------------------------------------------------
# the client under test


class LaunchLoop(threading.Thread):
    """RunInstances one at a time, each with its own ClientToken, through the replicas in
    turn. A launch that fails for any reason (refused connection, timeout, 503, 500) is sent
    again with the same token through the next replica until it is acknowledged."""

    def __init__(self, cluster: HaCluster, prefix: str, pace: float = 0.05, per_token_timeout: float = 40.0):
        super().__init__(name=f"launch-loop-{prefix}", daemon=True)
        self.cluster = cluster
        self.prefix = prefix
        self.pace = pace
        self.per_token_timeout = per_token_timeout
        self.acked: dict[str, str] = {}          # token -> instance id
        self.ack_times: list[float] = []         # monotonic, in ack order
        self.ack_via: Counter[int] = Counter()   # replica id -> acks
        self.retried: set[str] = set()           # tokens sent more than once
        self.errors: Counter[str] = Counter()
        self.failure: str | None = None
        self._stop_flag = threading.Event()
        self._image = cluster.image
        self.turn = 0  # which replica the first launch goes to
        self.in_flight: tuple[int, float] | None = None  # (replica id, sent at) of the send in hand

    def acks_since(self, t: float) -> int:
        return sum(1 for a in list(self.ack_times) if a >= t)

    def finish(self) -> None:
        """Stops after the launch in hand is acknowledged (never leaves a token half-sent)."""
        self._stop_flag.set()
        self.join(self.per_token_timeout + 15)
        assert not self.is_alive(), "the launch loop did not stop"
        assert self.failure is None, self.failure

    def run(self) -> None:
        clients = [(r.id, r.client(LOOP_CONFIG)) for r in self.cluster.replicas]
        turn = self.turn
        n = 0
        try:
            while not self._stop_flag.is_set():
                token = f"{self.prefix}-{n:05d}"
                give_up = time.monotonic() + self.per_token_timeout
                sends = 0
                while True:
                    rid, ec2 = clients[turn % len(clients)]
                    turn += 1
                    sends += 1
                    if sends > 1:
                        self.retried.add(token)
                    try:
                        self.in_flight = (rid, time.monotonic())
                        resp = ec2.run_instances(ImageId=self._image, InstanceType="t2.nano", MinCount=1,
                                                 MaxCount=1, ClientToken=token)
                    except Exception as e:  # noqa: BLE001 - any failure means: send it again
                        self.in_flight = None
                        code = ((getattr(e, "response", None) or {}).get("Error") or {}).get("Code")
                        self.errors[code or type(e).__name__] += 1
                        if time.monotonic() > give_up:
                            self.failure = f"launch {token} not acknowledged after {sends} sends: {e!r}"
                            return
                        time.sleep(0.05)
                        continue
                    self.in_flight = None
                    ids = [i["InstanceId"] for i in resp["Instances"]]
                    if len(ids) != 1:
                        self.failure = f"launch {token} acknowledged with {ids}"
                        return
                    self.acked[token] = ids[0]
                    self.ack_times.append(time.monotonic())
                    self.ack_via[rid] += 1
                    break
                n += 1
                time.sleep(self.pace)
        except BaseException as e:  # noqa: BLE001
            self.failure = f"launch loop crashed: {e!r}"


def all_instances(ec2) -> list[dict]:
    out = []
    for page in ec2.get_paginator("describe_instances").paginate():
        for res in page["Reservations"]:
            out.extend(res["Instances"])
    return out


def check_exactly_once(cluster: HaCluster, loop: LaunchLoop, via: list[Replica] | None = None) -> list[dict]:
    """Every acknowledged launch is one instance with the acknowledged id, seen identically
    through every replica (or those in `via`); nothing else exists; replaying a token
    returns the same instance. Returns the instances."""
    assert loop.acked, "nothing was acknowledged"
    via = via or cluster.replicas
    views = {}
    for r in via:
        instances = [i for i in all_instances(r.client()) if i.get("ClientToken", "").startswith(loop.prefix + "-")]
        views[r.id] = instances
        by_token: dict[str, list[str]] = defaultdict(list)
        for i in instances:
            by_token[i["ClientToken"]].append(i["InstanceId"])
        doubled = {t: ids for t, ids in by_token.items() if len(ids) != 1}
        assert not doubled, f"via clc{r.id}: tokens with more than one instance: {doubled}"
        unacked = sorted(set(by_token) - set(loop.acked))
        assert not unacked, f"via clc{r.id}: instances for tokens never acknowledged: {unacked}"
        missing = sorted(set(loop.acked) - set(by_token))
        assert not missing, f"via clc{r.id}: acknowledged launches that do not exist: " \
            + ", ".join(f"{t}={loop.acked[t]}" for t in missing)
        wrong = {t: (loop.acked[t], ids[0]) for t, ids in by_token.items() if ids[0] != loop.acked[t]}
        assert not wrong, f"via clc{r.id}: token -> (acknowledged, existing) differ: {wrong}"
        assert len(instances) == len(loop.acked)
    ids = [sorted(i["InstanceId"] for i in v) for v in views.values()]
    assert all(x == ids[0] for x in ids)

    # Replaying a token is a no-op answered with the original instance, whoever leads now.
    # Every retried token (the ones a failover touched) plus a spread of the others.
    tokens = sorted(loop.acked)
    sample = sorted(loop.retried | set(tokens[:: max(1, len(tokens) // 15)]))
    clients = [r.client() for r in via]
    image = cluster.image
    for k, token in enumerate(sample):
        resp = clients[k % len(clients)].run_instances(ImageId=image, InstanceType="t2.nano", MinCount=1, MaxCount=1,
                                            ClientToken=token)
        assert [i["InstanceId"] for i in resp["Instances"]] == [loop.acked[token]], f"replay of {token}"
    after = [i for i in all_instances(clients[0]) if i.get("ClientToken", "").startswith(loop.prefix + "-")]
    assert len(after) == len(loop.acked), "replaying tokens made new instances"
    return next(iter(views.values()))


def wait_all_running(ec2, ids: list[str], timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        states = {}
        instances = []
        for k in range(0, len(ids), 200):
            for res in ec2.describe_instances(InstanceIds=ids[k:k + 200])["Reservations"]:
                instances.extend(res["Instances"])
        states = {i["InstanceId"]: i["State"]["Name"] for i in instances}
        if len(states) == len(ids) and all(s == "running" for s in states.values()):
            return instances
        assert time.monotonic() < deadline, \
            f"not all running after {timeout:.0f} s: {Counter(states.values())}, " \
            f"not running: {sorted(i for i, s in states.items() if s != 'running')[:20]}"
        time.sleep(0.5)


def _nc_events(nc: Proc) -> tuple[Counter, Counter]:
    """Per instance, how often the node started its domain and how often it stopped or
    destroyed one, from the NC log."""
    started, stopped = Counter(), Counter()
    for line in nc.log().splitlines():
        m = re.search(r"instance=(i-[0-9a-f]+)", line)
        if not m:
            continue
        if "domain started" in line:
            started[m.group(1)] += 1
        elif any(w in line for w in ("domain destroyed", "domain undefined", "graceful shutdown requested",
                                     "domain rebooted")):
            stopped[m.group(1)] += 1
    return started, stopped


class Load:
    """Several launch loops at once, each starting on a different replica, so that at any
    moment launches are in flight through the leader and through the followers."""

    def __init__(self, cluster: HaCluster, prefix: str, workers: int = 3):
        self.cluster = cluster
        self.loops = []
        for w in range(workers):
            loop = LaunchLoop(cluster, f"{prefix}-w{w}")
            loop.turn = w
            self.loops.append(loop)

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def acks_since(self, t: float) -> int:
        return sum(loop.acks_since(t) for loop in self.loops)

    def ack_times(self) -> list[float]:
        return sorted(t for loop in self.loops for t in list(loop.ack_times))

    def wait_acks(self, n: int, since: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.acks_since(since) < n:
            for loop in self.loops:
                assert loop.failure is None, loop.failure
                assert loop.is_alive(), f"{loop.name} died"
            assert time.monotonic() < deadline, (
                f"only {self.acks_since(since)} of {n} launches acknowledged in {timeout:.0f} s; "
                f"errors so far: {self.errors()}{self.cluster.deaths()}")
            time.sleep(0.05)

    def errors(self) -> dict[str, int]:
        return dict(sum((loop.errors for loop in self.loops), Counter()))

    def finish(self) -> None:
        for loop in self.loops:
            loop._stop_flag.set()
        for loop in self.loops:
            loop.finish()

    def summary(self) -> str:
        acked = sum(len(loop.acked) for loop in self.loops)
        via = sum((loop.ack_via for loop in self.loops), Counter())
        retried = sum(len(loop.retried) for loop in self.loops)
        return (f"{acked} launches acknowledged ({dict(sorted(via.items()))} by replica), "
                f"{retried} needed more than one send; errors: {self.errors()}")


def run_failover(ha: HaCluster, victim_is_leader: bool, prefix: str) -> None:
    load = Load(ha, prefix)
    load.start()
    try:
        load.wait_acks(10, since=0, timeout=30)
        leader = ha.leader()
        term_before = leader.status()["term"]
        victim = leader if victim_is_leader else next(r for r in ha.replicas if r is not leader)
        # Kill it while a launch sent straight to it is being served: that launch may or may
        # not have committed, and its client only sees a dropped connection.
        aim_until = time.monotonic() + 5
        while time.monotonic() < aim_until and not any(
                (f := loop.in_flight) and f[0] == victim.id and time.monotonic() - f[1] > 0.003
                for loop in load.loops):
            time.sleep(0.0005)
        killed_at = time.monotonic()
        victim.kill()

        # The survivors keep taking launches (after an election, if the leader died).
        load.wait_acks(1, since=killed_at, timeout=20)
        first_ack = min(t for t in load.ack_times() if t >= killed_at) - killed_at
        load.wait_acks(20, since=killed_at, timeout=30)
        while time.monotonic() < killed_at + 4:
            time.sleep(0.1)
        survivors = [r for r in ha.replicas if r is not victim]
        new_leader = ha.leader(among=survivors)
        restarted_at = time.monotonic()
        down = [t for t in load.ack_times() if killed_at <= t < restarted_at]
        print(f"killed {'leader' if victim_is_leader else 'follower'} clc{victim.id}; first launch "
              f"acknowledged {first_ack:.2f} s later; {len(down)} acknowledged in {restarted_at - killed_at:.1f} s "
              f"while it was down; leader now clc{new_leader.id}")
        if victim_is_leader:
            assert new_leader is not victim
        else:
            # Losing a follower is no reason for an election, and no launch had to wait.
            assert new_leader is leader and new_leader.status()["term"] == term_before
            gaps = [b - a for a, b in zip([killed_at] + down, down + [restarted_at])]
            assert max(gaps) < 3.0, f"launches stalled for {max(gaps):.1f} s while a follower was down"

        # The victim comes back with the same data dir and flags, rejoins and catches up.
        victim.start()
        ha.wait_rc(victim, timeout=30)
        load.wait_acks(10, since=time.monotonic(), timeout=30)
    finally:
        for loop in load.loops:
            loop._stop_flag.set()
    load.finish()
    print(load.summary())
    unexpected = set(load.errors()) - TRANSIENT
    assert not unexpected, f"clients saw errors other than transient ones: {load.errors()}"

    applied = ha.wait_caught_up()
    print(f"applied indexes after catch-up: {applied}")
    ids = []
    for loop in load.loops:
        ids += [i["InstanceId"] for i in check_exactly_once(ha, loop)]
    assert len(ids) == len(set(ids))
    wait_all_running(ha.r(victim.id).client(), ids)
    # The node started each instance once and never stopped one: no replica, not even one
    # that restarted believing it still led, got an old desired state through to the node.
    started, stopped = _nc_events(ha.nc)
    assert not stopped, f"the node stopped or destroyed instances: {stopped}"
    assert {started[i] for i in ids} == {1}, {i: started[i] for i in ids if started[i] != 1}
    # The restarted replica follows the current leader.
    view = victim.status()
    assert view["role"] in ("follower", "leader"), view
    assert view["leader"] == ha.leader().id, view

    if victim_is_leader:
        # A second failover: now the restarted replica is in every majority (and may lead),
        # so what it rebuilt is what the group serves. Still everything, exactly once.
        second = ha.leader()
        second.kill()
        survivors = [r for r in ha.replicas if r is not second]
        new_leader = ha.leader(among=survivors)
        print(f"second failover: killed clc{second.id}, leader now clc{new_leader.id}")
        for loop in load.loops:
            check_exactly_once(ha, loop, via=survivors)


# --------------------------------------------------------------------------------------
# tests


def test_leader_kill_loses_nothing(ha):
    run_failover(ha, victim_is_leader=True, prefix="leader-kill")


def test_follower_kill(ha):
    run_failover(ha, victim_is_leader=False, prefix="follower-kill")


def test_full_cluster_restart_keeps_state_and_running_instances(ha):
    ec2 = ha.r(1).client()
    resp = ec2.run_instances(ImageId=ha.image, InstanceType="t2.nano", MinCount=4, MaxCount=4,
                             ClientToken="full-restart-batch")
    ids = sorted(i["InstanceId"] for i in resp["Instances"])
    before = {i["InstanceId"]: i for i in wait_all_running(ec2, ids)}
    started_before, stopped_before = _nc_events(ha.nc)
    assert all(started_before[i] == 1 for i in ids), started_before
    assert not stopped_before

    # Every CLC dies at once. The CC and the node keep going on their own.
    for r in ha.replicas:
        r.kill()
    time.sleep(3)
    assert ha.cc.running and ha.nc.running

    for r in ha.replicas:
        r.start()
    ha.wait_rc(*ha.replicas)
    ha.wait_zone(ha.r(2))
    ha.wait_caught_up()

    for r in ha.replicas:
        after = {i["InstanceId"]: i for i in all_instances(r.client()) if i["InstanceId"] in before}
        assert sorted(after) == ids, f"via clc{r.id}"
        for iid in ids:
            assert after[iid]["State"]["Name"] == "running", (r.id, iid, after[iid]["State"])
            assert after[iid]["LaunchTime"] == before[iid]["LaunchTime"], iid
            assert after[iid]["Placement"]["AvailabilityZone"] == ZONE
    # The same token still names the same launch.
    again = ha.r(3).client().run_instances(ImageId=ha.image, InstanceType="t2.nano", MinCount=4, MaxCount=4,
                                           ClientToken="full-restart-batch")
    assert sorted(i["InstanceId"] for i in again["Instances"]) == ids

    # New work goes through, and the node was never told to touch the old instances.
    new = ha.r(2).client().run_instances(ImageId=ha.image, InstanceType="t2.nano", MinCount=2, MaxCount=2)
    new_ids = [i["InstanceId"] for i in new["Instances"]]
    wait_all_running(ha.r(3).client(), ids + new_ids)
    started_after, stopped_after = _nc_events(ha.nc)
    assert {i: started_after[i] for i in ids} == {i: 1 for i in ids}, \
        f"the node restarted instances across the CLC outage: {started_after}"
    assert not stopped_after, f"the node stopped or rebooted instances: {stopped_after}"
    assert all(started_after[i] == 1 for i in new_ids)
    assert ha.cc.proc.poll() is None and ha.nc.proc.poll() is None


def test_a_large_answer_comes_through_a_follower(ha):
    """A whole-account DescribeInstances without MaxResults (what `aws ec2 describe-instances`
    sends) is answered by the leader and relayed whole by a follower, beyond the 4 MiB a
    gRPC message holds by default (found by the lab's fault drill)."""
    leader = ha.leader()
    follower = next(r for r in ha.replicas if r.id != leader.id)
    ec2 = leader.client()
    for batch in range(3):
        ec2.run_instances(ImageId=ha.image, InstanceType="t2.nano", MinCount=1000, MaxCount=1000,
                          ClientToken=f"large-answer-{batch}")
    raw = follower.client()
    raw.meta.events.register("after-call.ec2.DescribeInstances",
                             lambda http_response, **_: sizes.append(len(http_response.content)))
    sizes: list[int] = []
    answer = raw.describe_instances()
    assert sum(len(r["Instances"]) for r in answer["Reservations"]) == 3000
    assert "NextToken" not in answer and sizes and sizes[0] > 4 << 20, sizes


def upload_image(replica, data: bytes) -> dict:
    """Uploads `data` as a new image through `replica`'s admin API (the leader's: uploads
    are served by the leader only); the image as the API describes it."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{replica.admin_port}/v1/images?name=replicated-{uuid.uuid4().hex[:8]}",
        data=data, method="POST",
        headers={"Authorization": "Bearer " + replica.rc["CANOPY_ADMIN_TOKEN"]})
    with urllib.request.urlopen(req, timeout=60) as resp:
        image = json.load(resp)
    assert image["sha256"] == hashlib.sha256(data).hexdigest()
    return image


def wait_image_file(replicas, digest: str, data: bytes, timeout: float = 30) -> None:
    """Until every replica's image store holds `data` under its digest."""
    paths = [r.data / "images" / digest for r in replicas]
    deadline = time.monotonic() + timeout
    while not all(p.is_file() for p in paths):
        assert time.monotonic() < deadline, \
            f"missing after {timeout:.0f} s: {[str(p) for p in paths if not p.is_file()]}"
        time.sleep(0.2)
    for p in paths:
        assert p.read_bytes() == data, p


def test_uploaded_image_bytes_reach_every_replica(ha, tmp_path):
    """An image uploaded through the leader's admin API ends up, byte for byte, in every
    replica's image store (DATA_DIR/images/<sha256>): losing the replica that received it
    no longer loses it."""
    data = b"QFI\xfb" + uuid.uuid4().bytes * (3 << 16)  # a "qcow2" of 3 MiB, several chunks
    image = upload_image(ha.leader(), data)
    wait_image_file(ha.replicas, image["sha256"], data)


def test_an_image_outlives_the_disk_of_the_replica_that_received_it(ha):
    """The replica an image was uploaded to loses its disk for good (SIGKILL, data directory
    deleted): the survivors still launch from the image, and the replica that replaces it
    (the same id, empty, added back as operations.md §4(b) says) gets the image's bytes from
    them, byte for byte, while it catches up."""
    importer = ha.leader()
    data = b"QFI\xfb" + uuid.uuid4().bytes * (1 << 16)
    image = upload_image(importer, data)
    wait_image_file(ha.replicas, image["sha256"], data)

    importer.kill()
    shutil.rmtree(importer.data)
    survivors = [r for r in ha.replicas if r is not importer]
    leader = ha.leader(among=survivors)
    leader.admin(f"/v1/cluster/members/{importer.id}", method="DELETE", timeout=30)
    ec2 = leader.client()
    [launched] = ec2.run_instances(ImageId=image["image_id"], InstanceType="t2.nano", MinCount=1, MaxCount=1,
                                   ClientToken=f"outlives-{uuid.uuid4().hex[:8]}")["Instances"]
    wait_all_running(ec2, [launched["InstanceId"]])

    # The replacement: same id and address, empty directory, started as a joiner and added
    # back (as a voter once it has caught up).
    importer.configure(None)
    importer.start()
    view = leader.admin("/v1/cluster/members", method="POST", timeout=90,
                        body={"id": importer.id, "address": f"http://127.0.0.1:{importer.raft}"})
    assert any(m["id"] == importer.id and m["voter"] for m in view["members"]), view
    ha.wait_rc(importer)
    wait_image_file([importer], image["sha256"], data)
    # It serves the cloud as any replica does: the instance launched while it was gone.
    found = importer.client().describe_instances(InstanceIds=[launched["InstanceId"]])
    assert found["Reservations"][0]["Instances"][0]["ImageId"] == image["image_id"]
