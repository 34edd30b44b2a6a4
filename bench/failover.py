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
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from botocore.config import Config

REPO = Path(__file__).resolve().parents[1]
# The process and cluster helpers are the HA end-to-end tests' (tests/e2e/ha_cluster.py).
sys.path.insert(0, str(REPO / "tests" / "e2e"))
from ha_cluster import HaCluster, Replica  # noqa: E402

ZONE = "bench-1a"
# `total_max_attempts` counts sends (`max_attempts` would count retries): one send, no retry.
PROBE = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=0.5, read_timeout=3)
PATIENT = Config(retries={"max_attempts": 10, "mode": "standard"}, connect_timeout=2, read_timeout=20)
LEADER_TIMEOUT = 20.0

_CLUSTERS: list["Cluster"] = []


def _stop_all() -> None:
    for c in _CLUSTERS:
        for p in reversed(c.procs()):
            try:
                p.stop()
            except Exception:
                pass


class Cluster(HaCluster):
    """3 CLC replicas, a CC and a node big enough for every launch, each process in its own
    session (Ctrl-C reaches this script only, which then stops everything)."""

    def __init__(self, binary: str, work: Path, keep: bool):
        super().__init__(binary, work, ZONE, nc_size=(1000000, 1000000000, 100000000), poll=0.05,
                         status_timeout=1.0, keep=keep, dump_logs=False, stop_timeout=10.0, new_session=True)
        self.probes: dict[int, object] = {}  # replica id -> EC2 client with PROBE, made once
        _CLUSTERS.append(self)

    def start(self) -> None:
        super().start()
        self.probes = {r.id: r.client(PROBE) for r in self.replicas}

    def wait_healthy(self, timeout: float = 60) -> None:
        """All three up, agreeing on one leader, each having applied what the leader had, and
        a launch going through."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader(LEADER_TIMEOUT)
            target = (leader.status() or {}).get("last_applied_index")
            views = [r.status() for r in self.replicas]
            if target is not None and all(v and v["leader"] == leader.id and (v["last_applied_index"] or 0) >= target
                                          for v in views):
                break
            if time.monotonic() > deadline:
                sys.exit(f"cluster not healthy within {timeout} s: {views}")
            time.sleep(0.1)
        self.replicas[0].client(PATIENT).run_instances(
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
    leader = cluster.leader(LEADER_TIMEOUT)
    survivors = [r for r in cluster.replicas if r is not leader]
    token = f"failover-{n}-{uuid.uuid4().hex[:12]}"
    seen: dict = {}
    stop = threading.Event()
    errors: dict[str, int] = {}
    clients = list(cluster.probes.items())

    killed_at = time.monotonic()
    leader.kill()
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
    assert len(resp["Instances"]) == 1, f"round {n}: one launch acknowledged with {resp['Instances']}"
    # Back to three: restart the victim with the same data dir and flags; wait for catch-up.
    restart_at = time.monotonic()
    leader.start()
    cluster.wait_rc(leader)
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

    cluster = Cluster(str(binary), work, keep=args.keep)
    ok = False
    try:
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
    except AssertionError as e:  # a readiness check failed: say which, no traceback
        sys.exit(f"failover: {e}")
    finally:
        _stop_all()
        cluster.close(failed=not ok)  # removes the work dir after a good run unless --keep
        if ok and args.keep:
            print(f"logs kept in {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
