#!/usr/bin/env python3
"""Failover benchmark for the replicated cloud controller: how long RunInstances is
unavailable when the Raft leader dies.

Starts three `canopy clc` replicas, one `canopy cc` and one big simulated `canopy nc` on
loopback, then RUNS times: finds the leader, SIGKILLs it and measures the time from the kill
to the first RunInstances acknowledged through a surviving replica. The client is a tight
loop over every replica's EC2 endpoint (it is not told which one died), one ClientToken per
round, short timeouts, no SDK retries. Then the killed replica is restarted with the same
data dir and flags and the next round waits until it has caught up.

    .venv/bin/python bench/failover.py [--runs 7] [--binary target/release/canopy] [--keep]

Needs boto3 (the repo's .venv has it). Uses target/release/canopy if it exists, else
target/debug/canopy. Every process it starts is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

REPO = Path(__file__).resolve().parents[1]
ZONE = "bench-1a"
# `total_max_attempts` counts sends (`max_attempts` would count retries): one send, no retry.
PROBE = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=0.5, read_timeout=3)
PATIENT = Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=2, read_timeout=20)

_PROCS: list["Proc"] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Proc:
    def __init__(self, name: str, args: list[str], work: Path):
        self.name, self.args = name, args
        self.log_path = work / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        _PROCS.append(self)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CANOPY_", "AWS_"))}
        env["NO_COLOR"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {' '.join(self.args)}\n".encode())
            log.flush()
            # Own session: Ctrl-C reaches this script only, which then stops everything.
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _stop_all() -> None:
    for p in reversed(_PROCS):
        try:
            p.stop()
        except Exception:
            pass


def parse_rc(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, _, v = line[len("export "):].partition("=")
            words = shlex.split(v)
            out[k.strip()] = words[0] if words else ""
    return out


class Replica:
    def __init__(self, rid: int, binary: str, work: Path):
        self.id = rid
        self.data = work / f"clc{rid}"
        self.raft, self.ec2, self.admin_port, self.grpc = (free_port() for _ in range(4))
        self.binary, self.work = binary, work
        self.rc: dict[str, str] = {}
        self.proc: Proc | None = None
        self.client = None

    def configure(self, members: str) -> None:
        self.proc = Proc(f"clc{self.id}", [
            self.binary, "clc", "--data-dir", str(self.data), "--replica-id", str(self.id),
            "--raft-listen", f"127.0.0.1:{self.raft}", "--members", members,
            "--ec2-listen", f"127.0.0.1:{self.ec2}", "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--grpc-listen", f"127.0.0.1:{self.grpc}"], self.work)

    def start(self) -> None:
        (self.data / "canopyrc").unlink(missing_ok=True)
        self.proc.start()

    def wait_ready(self, timeout: float = 60) -> None:
        rc = self.data / "canopyrc"
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.running:
                sys.exit(f"clc{self.id} exited; see {self.proc.log_path}")
            if rc.exists():
                parsed = parse_rc(rc)
                if "CANOPY_ADMIN_TOKEN" in parsed and "AWS_SECRET_ACCESS_KEY" in parsed:
                    self.rc = parsed
                    break
            if time.monotonic() > deadline:
                sys.exit(f"clc{self.id} wrote no canopyrc in {timeout:.0f} s; see {self.proc.log_path}")
            time.sleep(0.05)
        if self.client is None:
            self.client = self.make_client(PROBE)

    def make_client(self, config: Config):
        return boto3.session.Session().client(
            "ec2", endpoint_url=f"http://127.0.0.1:{self.ec2}", region_name=self.rc["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.rc["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.rc["AWS_SECRET_ACCESS_KEY"],
            config=config)

    def admin(self, path: str, timeout: float = 2.0):
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                     headers={"Authorization": "Bearer " + self.rc["CANOPY_ADMIN_TOKEN"]})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    def status(self) -> dict | None:
        if not (self.proc and self.proc.running and self.rc):
            return None
        try:
            return self.admin("/v1/replica", timeout=1.0)
        except (OSError, ValueError):
            return None


class Cluster:
    def __init__(self, binary: str, work: Path):
        self.work = work
        self.replicas = [Replica(i, binary, work) for i in (1, 2, 3)]
        members = ",".join(f"{r.id}=127.0.0.1:{r.raft}" for r in self.replicas)
        for r in self.replicas:
            r.configure(members)
        cc, nc = free_port(), free_port()
        clcs = ",".join(f"http://127.0.0.1:{r.grpc}" for r in self.replicas)
        self.cc = Proc("cc", [binary, "cc", "--zone", ZONE, "--clc", clcs, "--listen", f"127.0.0.1:{cc}"], work)
        self.nc = Proc("nc", [binary, "nc", "--node-id", "hv-1", "--cc", f"http://127.0.0.1:{cc}",
                              "--listen", f"127.0.0.1:{nc}", "--hypervisor", "sim", "--vcpus", "1000000",
                              "--memory-mib", "1000000000", "--disk-gib", "100000000"], work)
        self.image = ""

    def start(self) -> None:
        self.nc.start()
        self.cc.start()
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready()
        ec2 = self.replicas[0].make_client(PATIENT)
        deadline = time.monotonic() + 60
        while not any(z["ZoneName"] == ZONE and z["State"] == "available"
                      for z in ec2.describe_availability_zones()["AvailabilityZones"]):
            if time.monotonic() > deadline:
                sys.exit(f"zone {ZONE} never became available")
            time.sleep(0.2)
        while not any(n["node_id"] == "hv-1" and n["healthy"] for n in self.replicas[0].admin("/v1/nodes")):
            if time.monotonic() > deadline:
                sys.exit("node hv-1 never became healthy")
            time.sleep(0.2)
        self.image = ec2.describe_images()["Images"][0]["ImageId"]

    def leader(self, timeout: float = 20) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [v for v in (r.status() for r in self.replicas) if v]
            leaders = [v for v in views if v["role"] == "leader"]
            if leaders:
                top = max(leaders, key=lambda v: v["term"])
                if sum(1 for v in views if v["leader"] == top["replica_id"] and v["term"] == top["term"]) >= 2:
                    return self.replicas[top["replica_id"] - 1]
            time.sleep(0.05)
        sys.exit(f"no agreed leader within {timeout} s")

    def wait_healthy(self, timeout: float = 60) -> None:
        """All three up, agreeing on one leader, each having applied what the leader had, and
        a launch going through."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            target = (leader.status() or {}).get("last_applied_index")
            views = [r.status() for r in self.replicas]
            if target is not None and all(v and v["leader"] == leader.id and (v["last_applied_index"] or 0) >= target
                                          for v in views):
                break
            if time.monotonic() > deadline:
                sys.exit(f"cluster not healthy within {timeout} s: {views}")
            time.sleep(0.1)
        self.replicas[0].make_client(PATIENT).run_instances(
            ImageId=self.image, InstanceType="t2.nano", MinCount=1, MaxCount=1)


def watch_election(survivors: list[Replica], since: float, out: dict, stop: threading.Event) -> None:
    """Timestamps the first moment a survivor says it leads."""
    while not stop.is_set():
        for r in survivors:
            v = r.status()
            if v and v["role"] == "leader":
                out["elected"] = time.monotonic() - since
                out["leader"] = r.id
                return
        time.sleep(0.01)


def one_round(cluster: Cluster, n: int) -> dict:
    leader = cluster.leader()
    survivors = [r for r in cluster.replicas if r is not leader]
    token = f"failover-{n}-{uuid.uuid4().hex[:12]}"
    seen: dict = {}
    stop = threading.Event()
    errors: dict[str, int] = {}
    clients = [(r.id, r.client) for r in cluster.replicas]

    killed_at = time.monotonic()
    leader.proc.kill()
    watcher = threading.Thread(target=watch_election, args=(survivors, killed_at, seen, stop), daemon=True)
    watcher.start()
    sends, turn = 0, n
    while True:
        rid, ec2 = clients[turn % 3]
        turn += 1
        sends += 1
        try:
            resp = ec2.run_instances(ImageId=cluster.image, InstanceType="t2.nano", MinCount=1, MaxCount=1,
                                     ClientToken=token)
            acked = time.monotonic() - killed_at
            via = rid
            break
        except Exception as e:  # noqa: BLE001 - any failure: send again through the next one
            code = ((getattr(e, "response", None) or {}).get("Error") or {}).get("Code") or type(e).__name__
            errors[code] = errors.get(code, 0) + 1
            if time.monotonic() - killed_at > 60:
                sys.exit(f"round {n}: no launch acknowledged within 60 s of the kill: {errors}")
    stop.set()
    watcher.join(1)
    assert len(resp["Instances"]) == 1
    # Back to three: restart the victim with the same data dir and flags; wait for catch-up.
    restart_at = time.monotonic()
    leader.start()
    leader.wait_ready()
    cluster.wait_healthy()
    return {"victim": leader.id, "acked": acked, "elected": seen.get("elected"), "new_leader": seen.get("leader"),
            "via": via, "sends": sends, "errors": errors, "rejoin": time.monotonic() - restart_at}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="leader kills to measure (default 7)")
    ap.add_argument("--binary", help="canopy binary (default target/release/canopy, else target/debug/canopy)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir with the logs")
    args = ap.parse_args()

    if args.binary:
        binary = Path(args.binary)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        release, debug = target / "release" / "canopy", target / "debug" / "canopy"
        binary = release if release.exists() else debug
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        sys.exit(f"no canopy binary at {binary}: cargo build --release -p canopy, or pass --binary")
    build = "release" if "release" in binary.parts else "debug" if "debug" in binary.parts else "unknown"

    work = Path(tempfile.mkdtemp(prefix="canopy-failover-"))
    atexit.register(_stop_all)

    def on_signal(signum, _frame):
        _stop_all()
        print(f"\ninterrupted; processes stopped; logs in {work}", file=sys.stderr)
        os._exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?") if Path("/proc/cpuinfo").exists() else "?"
    print(f"canopy binary: {binary} ({build} build, modified {time.ctime(binary.stat().st_mtime)})")
    print(f"machine: nproc {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), {cpu}, "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}")
    print("setup: 3 CLC replicas + 1 CC + 1 simulated NC, loopback; Raft heartbeat 100 ms, election timeout 200-300 ms")
    print(f"work dir: {work}")

    ok = False
    try:
        cluster = Cluster(str(binary), work)
        t = time.monotonic()
        cluster.start()
        cluster.wait_healthy()
        print(f"cluster up in {time.monotonic() - t:.1f} s\n")
        print(f"{'run':>3}  {'killed':>6}  {'unavailable_s':>13}  {'elected_s':>9}  {'new_leader':>10}  "
              f"{'acked_via':>9}  {'sends':>5}  {'rejoin_s':>8}  errors")
        samples = []
        for n in range(1, args.runs + 1):
            s = one_round(cluster, n)
            samples.append(s["acked"])
            elected = f"{s['elected']:.3f}" if s["elected"] is not None else "-"
            print(f"{n:>3}  clc{s['victim']:<3}  {s['acked']:>13.3f}  {elected:>9}  "
                  f"{'clc' + str(s['new_leader']) if s['new_leader'] else '-':>10}  {'clc' + str(s['via']):>9}  "
                  f"{s['sends']:>5}  {s['rejoin']:>8.1f}  {s['errors']}", flush=True)
        print(f"\nkill -> first acknowledged RunInstances over {len(samples)} runs: "
              f"median {statistics.median(samples):.3f} s, min {min(samples):.3f} s, max {max(samples):.3f} s")
        ok = True
    finally:
        _stop_all()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
