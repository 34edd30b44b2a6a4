"""Canopy processes on loopback, shared by the end-to-end tests (test_ha.py, test_roles.py)
and the failover benchmark (bench/failover.py): `Proc`, one canopy process and its log, and
`HaCluster`, the replicated cloud controller as real processes: three `canopy clc` replicas
(`Replica`), one `canopy cc`, one simulated `canopy nc`.

A plain module, not a conftest: it works outside pytest too (the benchmark puts this folder on
sys.path). Readiness checks fail with AssertionError, which the benchmark turns into an exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config

from conftest import Pki, _set_pdeathsig, free_port, parse_canopyrc

NODE = "hv-1"
READY_TIMEOUT = 60.0
# Clients used for checks: ride out an election with the SDK's own retries (503s).
CHECK_CONFIG = Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=3, read_timeout=20)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Proc:
    """One canopy process; its log survives restarts (each start is marked in it).

    `stop_timeout`: how long stop() waits for the process before SIGKILL. `new_session`: run it
    in its own session, so that a Ctrl-C in the terminal reaches only the Python process (which
    then stops everything). Either way it gets SIGTERM if the Python process dies."""

    def __init__(self, name: str, args: list[str], log_dir: Path, *, stop_timeout: float = 15.0,
                 new_session: bool = False):
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.stop_timeout = stop_timeout
        self.new_session = new_session

    def start(self) -> "Proc":
        assert not self.running, f"{self.name} already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.args)}\n".encode())
            log.flush()
            # The caller's credentials and settings stay out; its log filter (CANOPY_LOG) goes in.
            env = {k: v for k, v in os.environ.items()
                   if k == "CANOPY_LOG" or not k.startswith(("CANOPY_", "AWS_"))}
            env["NO_COLOR"] = "1"
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=self.new_session,
                                         preexec_fn=_set_pdeathsig)
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

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Sends `sig` and waits; SIGKILL if it has not exited after stop_timeout."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return _ANSI.sub("", self.log_path.read_text(errors="replace")) if self.log_path.exists() else ""

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class OneReplicaCloud:
    """A cloud as separate processes on loopback: one `canopy clc` replica (data in
    `root/clc`), a `canopy cc` for `zone` and a `canopy nc` for `node`, each with its
    certificate from a CA in `root/pki`. Nothing is started. `cc_args`/`nc_args` are added
    to their command lines (the node's hypervisor and size among them); `proc_options` go to
    every Proc."""

    def __init__(self, binary: str, root: Path, zone: str, node: str, *, cc_args=(), nc_args=(),
                 node_tls: bool = True, **proc_options):
        self.pki = Pki(binary, root / "pki")
        ec2, admin, grpc, raft, self.cc_port, nc_port = (free_port() for _ in range(6))
        self.data = root / "clc"
        self.rc_path = self.data / "canopyrc"
        self.clc = Proc("clc", [binary, "clc", "--data-dir", str(self.data), "--ec2-listen", f"127.0.0.1:{ec2}",
                                "--admin-listen", f"127.0.0.1:{admin}", "--grpc-listen", f"127.0.0.1:{grpc}",
                                "--raft-listen", f"127.0.0.1:{raft}",
                                "--tls-dir", self.pki.issue("clc", "1", with_ca_key=True)], root, **proc_options)
        self.cc = Proc("cc", [binary, "cc", "--zone", zone, "--clc", f"http://127.0.0.1:{grpc}",
                              "--listen", f"127.0.0.1:{self.cc_port}", "--tls-dir", self.pki.issue("zone", zone),
                              *cc_args], root, **proc_options)
        # node_tls=False: the test gives the node its TLS directory (a join, say).
        tls = ["--tls-dir", self.pki.issue("node", node)] if node_tls else []
        self.nc = Proc("nc", [binary, "nc", "--node-id", node, "--cc", self.cc_endpoint,
                              "--listen", f"127.0.0.1:{nc_port}", *tls, *nc_args], root, **proc_options)

    @property
    def cc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.cc_port}"

    def procs(self) -> tuple[Proc, Proc, Proc]:
        return self.clc, self.cc, self.nc


class Replica:
    """One `canopy clc` replica. `rc` is its canopyrc once HaCluster.wait_rc has read it."""

    def __init__(self, rid: int, binary: str, root: Path, status_timeout: float = 2.0, *, pki: Pki,
                 **proc_options):
        self.id = rid
        self.tls_dir = pki.issue("clc", str(rid), with_ca_key=True)
        self.data = root / f"clc{rid}"
        self.raft, self.ec2_port, self.admin_port, self.grpc = (free_port() for _ in range(4))
        self.proc: Proc | None = None
        self.rc: dict[str, str] = {}
        self.status_timeout = status_timeout
        self._binary = binary
        self._root = root
        self._proc_options = proc_options

    def configure(self, members: str | None) -> None:
        """Its command line: one of the initial `members`, or (None) a joiner (`--join`)
        that waits to be added by the group."""
        group = ["--members", members] if members is not None else ["--join"]
        self.proc = Proc(f"clc{self.id}", [
            self._binary, "clc", "--data-dir", str(self.data), "--replica-id", str(self.id),
            "--raft-listen", f"127.0.0.1:{self.raft}", *group,
            "--ec2-listen", f"127.0.0.1:{self.ec2_port}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--grpc-listen", f"127.0.0.1:{self.grpc}", "--tls-dir", self.tls_dir,
        ], self._root, **self._proc_options)

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

    def admin(self, path: str, timeout: float = 5.0, *, method: str = "GET", body=None):
        """A call to this replica's admin API with its own token (`body` sent as JSON);
        the JSON answer, or raises."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": "Bearer " + self.rc["CANOPY_ADMIN_TOKEN"],
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def status(self) -> dict | None:
        """Its own Raft view (/v1/replica, never forwarded); None if it does not answer."""
        if not (self.running and self.rc):
            return None
        try:
            return self.admin("/v1/replica", timeout=self.status_timeout)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def client(self, config: Config = CHECK_CONFIG):
        return boto3.session.Session().client(
            "ec2", endpoint_url=self.endpoint, region_name=self.rc["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.rc["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.rc["AWS_SECRET_ACCESS_KEY"], config=config)


class HaCluster:
    """Three CLC replicas, a CC for `zone` and a simulated node `node` with `nc_size` =
    (vCPUs, memory MiB, disk GiB), all on free loopback ports, logs in `root`.

    `poll`: how often wait_rc and leader() look. `status_timeout`: the admin call behind
    Replica.status(). `proc_options` go to every Proc (stop_timeout, new_session).
    close() stops everything; on failure it says where the logs are (`dump_logs`: and prints
    their tails), otherwise it removes `root` unless `keep`."""

    def __init__(self, binary: str, root: Path, zone: str, *, node: str = NODE,
                 nc_size: tuple[int, int, int] = (4096, 4096 * 1024, 100000), poll: float = 0.1,
                 status_timeout: float = 2.0, keep: bool = True, dump_logs: bool = True, **proc_options):
        self.root = root
        self.zone = zone
        self.node = node
        self.poll = poll
        self.keep = keep
        self.dump_logs_on_failure = dump_logs
        self.pki = Pki(binary, root / "pki")
        self.replicas = [Replica(i, binary, root, status_timeout, pki=self.pki, **proc_options)
                         for i in (1, 2, 3)]
        members = ",".join(f"{r.id}=127.0.0.1:{r.raft}" for r in self.replicas)
        for r in self.replicas:
            r.configure(members)
        cc_port, nc_port = free_port(), free_port()
        clcs = ",".join(f"http://127.0.0.1:{r.grpc}" for r in self.replicas)
        self.cc = Proc("cc", [binary, "cc", "--zone", zone, "--clc", clcs, "--listen", f"127.0.0.1:{cc_port}",
                              "--tls-dir", self.pki.issue("zone", zone)], root, **proc_options)
        vcpus, memory_mib, disk_gib = nc_size
        self.nc = Proc("nc", [binary, "nc", "--node-id", node, "--cc", f"http://127.0.0.1:{cc_port}",
                              "--listen", f"127.0.0.1:{nc_port}", "--hypervisor", "sim", "--vcpus", str(vcpus),
                              "--memory-mib", str(memory_mib), "--disk-gib", str(disk_gib),
                              "--tls-dir", self.pki.issue("node", node)], root, **proc_options)
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
                time.sleep(self.poll)
        keys = {r.rc["AWS_ACCESS_KEY_ID"] for r in self.replicas if r.rc}
        assert len(keys) == 1, f"replicas disagree on the admin access key: {keys}"

    def wait_zone(self, via: Replica, timeout: float = READY_TIMEOUT) -> None:
        ec2 = via.client()
        deadline = time.monotonic() + timeout
        while True:
            zones = ec2.describe_availability_zones()["AvailabilityZones"]
            if any(z["ZoneName"] == self.zone and z["State"] == "available" for z in zones):
                break
            assert time.monotonic() < deadline, f"zone {self.zone} never became available: {zones}"
            time.sleep(0.2)
        # A zone is available once its CC heartbeats, possibly before its node registered.
        while True:
            nodes = via.admin("/v1/nodes")
            if any(n["node_id"] == self.node and n["healthy"] for n in nodes):
                return
            assert time.monotonic() < deadline, f"node {self.node} never became healthy: {nodes}"
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
            time.sleep(self.poll)
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

    def close(self, failed: bool) -> None:
        self.stop()
        if failed:
            if self.dump_logs_on_failure:
                print(f"cluster data and full logs kept in {self.root}")
                self.dump_logs()
            else:
                print(f"logs kept in {self.root}", file=sys.stderr)
        elif not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
