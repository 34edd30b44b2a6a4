"""The replicated cloud controller as real processes: three `canopy clc` replicas, one
`canopy cc`, one simulated `canopy nc`, all on loopback. Clients rotate over every replica
(followers forward to the leader) and replicas are SIGKILLed under load.

What must hold: every acknowledged RunInstances exists exactly once, a ClientToken retried
across a failover never makes a second instance, the group keeps accepting writes while a
majority is up, a restarted replica catches up, and a full CLC outage neither loses state
nor disturbs the instances the node is running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from conftest import _set_pdeathsig, find_binary, free_port, parse_canopyrc

ZONE = "ha-1a"
NODE = "hv-1"
READY_TIMEOUT = 60.0
# Clients used for checks: ride out an election with the SDK's own retries (503s).
CHECK_CONFIG = Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=3, read_timeout=20)
# The launch loop retries by hand (same token, next replica), so the SDK must not
# (`max_attempts` counts retries, `total_max_attempts` counts sends).
LOOP_CONFIG = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=10)
# What a client may see while a replica dies or restarts, and must simply retry: transport
# failures (the replica it called is gone) and 503 ServiceUnavailable (no leader yet, or the
# leader died holding the request). Anything else is a bug.
TRANSIENT = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
             "ServiceUnavailable"}



# --------------------------------------------------------------------------------------
# processes


class Proc:
    """One canopy process; its log survives restarts (each start is marked in it)."""

    def __init__(self, name: str, args: list[str], log_dir: Path):
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Proc":
        assert not self.running, f"{self.name} already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.args)}\n".encode())
            log.flush()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("CANOPY_", "AWS_"))}
            env["NO_COLOR"] = "1"
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, preexec_fn=_set_pdeathsig)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown path runs, exactly like a crash or a power cut."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", self.log_path.read_text(errors="replace")) \
            if self.log_path.exists() else ""

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class Replica:
    def __init__(self, rid: int, binary: str, root: Path):
        self.id = rid
        self.data = root / f"clc{rid}"
        self.raft, self.ec2_port, self.admin_port, self.grpc = (free_port() for _ in range(4))
        self.proc: Proc | None = None
        self.rc: dict[str, str] = {}
        self._binary = binary
        self._root = root

    def configure(self, members: str) -> None:
        self.proc = Proc(f"clc{self.id}", [
            self._binary, "clc", "--data-dir", str(self.data), "--replica-id", str(self.id),
            "--raft-listen", f"127.0.0.1:{self.raft}", "--members", members,
            "--ec2-listen", f"127.0.0.1:{self.ec2_port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--grpc-listen", f"127.0.0.1:{self.grpc}",
        ], self._root)

    @property
    def rc_path(self) -> Path:
        return self.data / "canopyrc"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ec2_port}"

    def start(self) -> None:
        # canopyrc appearing is the ready signal; never read last run's.
        self.rc_path.unlink(missing_ok=True)
        self.proc.start()

    def kill(self) -> None:
        self.proc.kill()

    @property
    def running(self) -> bool:
        return self.proc.running

    def admin(self, path: str, timeout: float = 5.0):
        """GET on this replica's admin API with its own token; JSON, or raises."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                     headers={"Authorization": "Bearer " + self.rc["CANOPY_ADMIN_TOKEN"]})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def status(self) -> dict | None:
        """Its own Raft view (/v1/replica, never forwarded); None if it does not answer."""
        if not self.running:
            return None
        try:
            return self.admin("/v1/replica", timeout=2.0)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def client(self, config: Config = CHECK_CONFIG):
        return boto3.session.Session().client(
            "ec2", endpoint_url=self.endpoint, region_name=self.rc["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.rc["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.rc["AWS_SECRET_ACCESS_KEY"], config=config)


class HaCluster:
    def __init__(self, binary: str, root: Path):
        self.root = root
        self.replicas = [Replica(i, binary, root) for i in (1, 2, 3)]
        members = ",".join(f"{r.id}=127.0.0.1:{r.raft}" for r in self.replicas)
        for r in self.replicas:
            r.configure(members)
        cc_port, nc_port = free_port(), free_port()
        clcs = ",".join(f"http://127.0.0.1:{r.grpc}" for r in self.replicas)
        self.cc = Proc("cc", [binary, "cc", "--zone", ZONE, "--clc", clcs, "--listen", f"127.0.0.1:{cc_port}"], root)
        # Big enough for every t2.nano the tests launch (1 vCPU each).
        self.nc = Proc("nc", [binary, "nc", "--node-id", NODE, "--cc", f"http://127.0.0.1:{cc_port}",
                              "--listen", f"127.0.0.1:{nc_port}", "--hypervisor", "sim", "--vcpus", "4096",
                              "--memory-mib", str(4096 * 1024), "--disk-gib", "100000"], root)
        self._image: str | None = None

    def procs(self) -> list[Proc]:
        return [r.proc for r in self.replicas] + [self.cc, self.nc]

    def deaths(self) -> str:
        """Processes that exited without the test stopping them, with their exit status
        (-9: SIGKILLed from outside; other negatives: killed by that signal, e.g. a crash)."""
        dead = {p.name: p.proc.returncode for p in self.procs() if p.proc is not None and p.proc.poll() is not None}
        return f"; processes that died on their own: {dead}" if dead else ""

    def r(self, rid: int) -> Replica:
        return self.replicas[rid - 1]

    # ---- start and readiness

    def start(self) -> None:
        self.nc.start()
        self.cc.start()
        for r in self.replicas:
            r.start()
        self.wait_rc(*self.replicas)
        self.wait_zone(self.replicas[0])

    def wait_rc(self, *replicas: Replica, timeout: float = READY_TIMEOUT) -> None:
        """Until each has written canopyrc: it has seen a leader and the admin account."""
        deadline = time.monotonic() + timeout
        for r in replicas:
            while True:
                assert r.running, f"clc{r.id} exited with {r.proc.proc and r.proc.proc.returncode}:\n" \
                    + r.proc.log_tail(40)
                if r.rc_path.exists():
                    rc = parse_canopyrc(r.rc_path.read_text())
                    if "CANOPY_ADMIN_TOKEN" in rc and "AWS_SECRET_ACCESS_KEY" in rc:
                        r.rc = rc
                        break
                assert time.monotonic() < deadline, f"clc{r.id} wrote no canopyrc within {timeout:.0f} s"
                time.sleep(0.1)
        keys = {r.rc["AWS_ACCESS_KEY_ID"] for r in self.replicas if r.rc}
        assert len(keys) == 1, f"replicas disagree on the admin access key: {keys}"

    def wait_zone(self, via: Replica, timeout: float = READY_TIMEOUT) -> None:
        ec2 = via.client()
        deadline = time.monotonic() + timeout
        while True:
            zones = ec2.describe_availability_zones()["AvailabilityZones"]
            if any(z["ZoneName"] == ZONE and z["State"] == "available" for z in zones):
                break
            assert time.monotonic() < deadline, f"zone {ZONE} never became available: {zones}"
            time.sleep(0.2)
        # A zone is available once its CC heartbeats, possibly before its node registered.
        while True:
            nodes = via.admin("/v1/nodes")
            if any(n["node_id"] == NODE and n["healthy"] for n in nodes):
                return
            assert time.monotonic() < deadline, f"node {NODE} never became healthy: {nodes}"
            time.sleep(0.2)

    @property
    def image(self) -> str:
        if self._image is None:
            self._image = self.replicas[0].client().describe_images()["Images"][0]["ImageId"]
        return self._image

    # ---- the group

    def leader(self, timeout: float = 15.0, among: list[Replica] | None = None) -> Replica:
        """The replica that says it leads, once a majority of the running ones agree on it."""
        deadline = time.monotonic() + timeout
        views: dict[int, dict | None] = {}
        while time.monotonic() < deadline:
            views = {r.id: r.status() for r in (among or self.replicas)}
            leaders = [v for v in views.values() if v and v["role"] == "leader"]
            if leaders:
                top = max(leaders, key=lambda v: v["term"])
                agree = [v for v in views.values() if v and v["leader"] == top["replica_id"] and v["term"] == top["term"]]
                if len(agree) >= 2:
                    return self.r(top["replica_id"])
            time.sleep(0.1)
        raise AssertionError(f"no agreed leader within {timeout:.0f} s: {views}{self.deaths()}")

    def wait_caught_up(self, timeout: float = 30.0) -> dict[int, int]:
        """Until every replica has applied everything the leader had applied when asked."""
        leader = self.leader()
        target = leader.status()["last_applied_index"]
        deadline = time.monotonic() + timeout
        while True:
            applied = {r.id: (r.status() or {}).get("last_applied_index") for r in self.replicas}
            if all(a is not None and a >= target for a in applied.values()):
                return applied
            assert time.monotonic() < deadline, \
                f"replicas did not catch up with leader clc{leader.id} (applied {target}) in {timeout:.0f} s: " \
                f"{applied}{self.deaths()}"
            time.sleep(0.2)

    # ---- teardown

    def stop(self) -> None:
        for p in [self.nc, self.cc] + [r.proc for r in self.replicas]:
            p.stop()

    def dump_logs(self, lines: int = 150) -> None:
        for p in self.procs():
            print(f"----- {p.name} log ({p.log_path}), last {lines} lines -----\n{p.log_tail(lines)}")


@pytest.fixture
def ha(tmp_path, request):
    """Three CLC replicas, a CC for zone ha-1a and a simulated node, all ready."""
    cluster = HaCluster(str(find_binary()), tmp_path)
    failures_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if request.session.testsfailed > failures_before or not cluster.replicas[0].rc:
            print(f"cluster data and full logs kept in {tmp_path}")
            cluster.dump_logs()


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
