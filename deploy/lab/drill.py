#!/usr/bin/env python3
"""The lab's fault drill (deploy/lab/README.md, "Fault drill").

Runs an EC2 workload through the AWS SDK (boto3) against all three CLC replicas while it
injects faults one after the other, each followed by a recovery and a settle:

  kill-leader         docker kill the Raft leader's container, later docker start it
  partition-follower  docker network disconnect a follower from the lab network, reconnect
  partition-leader    the same for the leader
  kill-nc             docker kill a node controller, later docker start it
  restart-zone        docker stop a zone's CC and NCs, later docker start them

then stops the workload and checks what the cloud holds against what the client was told:
every acknowledged RunInstances exists exactly once with the ids it was answered with, no
instance appeared that the drill did not launch, none was lost, every instance settled in the
state the client asked for (running ones on a healthy node), and the three replicas' state
machines are identical (GET /v1/replica/digest at the same applied index).

Run it with the repository's venv on a running lab (deploy/lab/drill.sh does both):
  .venv/bin/python deploy/lab/drill.py [--help]
Exit status: 0 when every check passed, 1 when one failed, 2 when the drill could not run.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import boto3
import botocore.exceptions
from botocore.config import Config
from botocore.retries import standard as retry_standard

LAB = os.path.dirname(os.path.abspath(__file__))
REPLICAS = (1, 2, 3)
ALL_FAULTS = ("kill-leader", "partition-follower", "partition-leader", "kill-nc", "restart-zone")
# States an instance passes through; the checker waits for none of these.
TRANSITIONAL = {"pending", "stopping", "shutting-down"}
# How long a replica holds a request while it waits for a leader or a quorum before it answers
# 503 (the CLC's request_wait_secs, 5 s by default): a call that gets no answer for longer was
# held by the cloud past its own bound.
SERVER_WAIT = 5.0
T0 = time.monotonic()


def now():
    return time.monotonic()


def log(msg):
    print(f"[drill +{now() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class DrillError(Exception):
    """The drill cannot go on (the lab is not usable): reported, then the checker still runs."""


class NonRetryable(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


class GaveUp(Exception):
    def __init__(self, code, seconds):
        super().__init__(f"not acknowledged within {seconds:.0f}s (last error {code})")
        self.code = code


# ---------------------------------------------------------------------------------------------
# Errors: which ones the AWS SDKs retry (botocore's standard retry mode, the same rules as the
# other SDKs' standard mode: 500/502/503/504, throttling and transient codes, connection errors).

_TRANSIENT = retry_standard.TransientRetryableChecker()
_THROTTLED = retry_standard.ThrottledRetryableChecker()


class _Status:
    def __init__(self, status_code):
        self.status_code = status_code


def classify(exc):
    """(code, http status or None, would an AWS SDK retry it)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code") or "Unknown"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        ctx = retry_standard.RetryContext(
            attempt_number=1, parsed_response=exc.response,
            http_response=_Status(status) if status else None)
    else:
        code, status = type(exc).__name__, None
        ctx = retry_standard.RetryContext(attempt_number=1, caught_exception=exc)
    return code, status, bool(_TRANSIENT.is_retryable(ctx) or _THROTTLED.is_retryable(ctx))


# ---------------------------------------------------------------------------------------------
# What the client saw.


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = collections.Counter()  # op -> acknowledged calls
        self.attempts = collections.Counter()  # op -> HTTP attempts
        self.retries = collections.Counter()  # op -> attempts after the first
        self.errors = collections.Counter()  # (op, code, status, sdk retries it) -> count
        self.error_phases = collections.defaultdict(collections.Counter)  # (op, code) -> phase
        self.error_via = collections.defaultdict(collections.Counter)  # (op, code) -> replica
        self.error_sample = {}  # (op, code) -> the first message
        self.timeouts = []  # (sent, failed, replica, op, phase) of calls that got no answer
        self.held_when_refused = []  # instances the drill held at each InsufficientInstanceCapacity
        self.calls = []  # (sent, ended, replica, op, outcome) of every attempt
        self.by_endpoint = collections.Counter()  # replica -> acknowledged calls
        self.gave_up = collections.Counter()
        self.writes = []  # (sent, acked, replica) of every acknowledged write, in ack order
        self.instances_launched = 0

    def slowest(self, t0, t1, exclude):
        """The longest attempt sent in [t0, t1] through a replica not in `exclude`."""
        with self.lock:
            picked = [c for c in self.calls if t0 <= c[0] <= t1 and c[2] not in exclude]
        return max(picked, key=lambda c: c[1] - c[0], default=None)

    def write_acked(self, sent, acked, replica):
        with self.lock:
            self.writes.append((sent, acked, replica))

    def first_write(self, t0):
        """The first write acknowledged whose last attempt was sent at or after t0."""
        with self.lock:
            for sent, acked, replica in self.writes:
                if sent >= t0:
                    return acked, replica
        return None

    def writes_after(self, t0):
        with self.lock:
            return sum(1 for s, _, _ in self.writes if s >= t0)

    def max_gap(self, t0, t1):
        """The longest time without an acknowledged write in [t0, t1]."""
        with self.lock:
            acks = sorted(a for _, a, _ in self.writes if t0 <= a <= t1)
        points = [t0] + acks + [t1]
        return max(b - a for a, b in zip(points, points[1:]))


class Ledger:
    """Every launch the drill asked for, by client token, and every termination."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tokens = {}  # token -> {count, type, acked, reservation, instances, outcome}
        self.terminated = {}  # instance id -> when TerminateInstances was acknowledged
        self.terminate_unsure = set()  # TerminateInstances never acknowledged
        self.owner = {}  # instance id -> token


# ---------------------------------------------------------------------------------------------


class Drill:
    def __init__(self, args):
        self.args = args
        self.run_id = f"{int(time.time()) % 100000:05d}{os.getpid() % 1000:03d}"
        self.lock = threading.Lock()
        self.stats = Stats()
        self.load_stats = self.stats
        self.total_secs = 0.0
        self.ledger = Ledger()
        self.failures = []
        self.warnings = []
        self.faults = []
        self.stop = threading.Event()
        self.broken = {}  # service -> what the drill did to it (undone in heal())
        self.windows = []  # (service, from, to): when the drill had it killed/cut off/stopped
        self._down_since = {}
        self.phase = "preflight"
        self.capacity = ""
        self.held = 0  # instances launched (acknowledged) and not terminated (acknowledged)
        self.findings = []
        self.waited_for = []
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.env = self._read_canopyrc(args.canopyrc)
        prefix = args.port_prefix
        self.ec2_urls = {n: f"http://127.0.0.1:{prefix}{n}773" for n in REPLICAS}
        self.admin_urls = {n: f"http://127.0.0.1:{prefix}{n}774" for n in REPLICAS}
        self.tokens = {}
        self.no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.project = args.project
        self.network = f"{self.project}_lab"
        self.digest_result = "not run"
        self.checked = {}
        self.workload_secs = 0.0

    def fail(self, msg):
        log("FAILURE: " + msg)
        with self.lock:
            self.failures.append(msg)

    def warn(self, msg):
        log("warning: " + msg)
        with self.lock:
            self.warnings.append(msg)

    @staticmethod
    def _read_canopyrc(path):
        if not os.path.exists(path):
            raise DrillError(f"no {path}: run deploy/lab/up.sh first")
        env = {}
        for line in open(path):
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                k, v = line[len("export "):].split("=", 1)
                env[k] = shlex.split(v)[0] if v else ""
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not env.get(k):
                raise DrillError(f"{path} has no {k}")
        return env

    # -- Docker -------------------------------------------------------------------------------

    def docker(self, *argv, check=True, timeout=60):
        try:
            p = subprocess.run(["docker", *argv], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DrillError(f"docker {' '.join(argv)}: no answer within {timeout}s")
        if check and p.returncode != 0:
            raise DrillError(f"docker {' '.join(argv)} failed: {p.stderr.strip()}")
        return p.stdout.strip()

    def containers(self):
        """service -> {id, state, networks}, for every container of the lab's compose project."""
        out = self.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                          "--format", "{{.ID}}")
        ids = out.split()
        if not ids:
            return {}
        found = {}
        for c in json.loads(self.docker("inspect", *ids)):
            svc = c["Config"]["Labels"].get("com.docker.compose.service")
            found[svc] = {
                "id": c["Id"][:12],
                "running": c["State"]["Running"],
                "networks": c["NetworkSettings"]["Networks"],
            }
        return found

    def cid(self, service):
        c = self.containers().get(service)
        if not c:
            raise DrillError(f"no container for service {service} in project {self.project}")
        return c["id"]

    def container_ip(self, service):
        net = self.containers()[service]["networks"].get(self.network)
        return net and net.get("IPAddress")

    def _down(self, service, what):
        self.broken[service] = what
        self._down_since.setdefault(service, now())

    def _up(self, service):
        self.broken.pop(service, None)
        if service in self._down_since:
            self.windows.append((service, self._down_since.pop(service), now()))

    def disconnect(self, service):
        self._down(service, "disconnected")
        self.docker("network", "disconnect", self.network, self.cid(service))

    def reconnect(self, service):
        # --alias: the compose service name, by which the other components know it.
        self.docker("network", "connect", "--alias", service, self.network, self.cid(service))
        self._up(service)

    def kill(self, service):
        self._down(service, "killed")
        self.docker("kill", self.cid(service))

    def stop_gracefully(self, services):
        for s in services:
            self._down(s, "stopped")
        self.docker("stop", "-t", "5", *[self.cid(s) for s in services])

    def start(self, *services):
        self.docker("start", *[self.cid(s) for s in services])
        for s in services:
            self._up(s)

    def heal(self):
        """Undoes whatever the drill left broken (after a failure or ^C), and leftovers of an
        earlier interrupted drill: every lab container running and on the lab network."""
        try:
            for svc, c in sorted(self.containers().items()):
                if not c["running"]:
                    log(f"heal: starting {svc}")
                    self.docker("start", c["id"], check=False)
                if self.network not in c["networks"]:
                    log(f"heal: reconnecting {svc} to {self.network}")
                    self.docker("network", "connect", "--alias", svc, self.network, c["id"],
                                check=False)
            for svc in list(self.broken):
                self._up(svc)
        except DrillError as e:
            log(f"heal: {e}")

    def dns_check(self, service):
        """The service name still resolves, from another container, to its current address."""
        ip = self.container_ip(service)
        if not ip:
            self.fail(f"{service} has no address on {self.network} after reconnecting")
            return
        alias_ok = service in (self.containers()[service]["networks"][self.network].get("Aliases") or [])
        other = "cc-a" if service != "cc-a" else "cc-b"
        out = self.docker("exec", self.cid(other), "getent", "hosts", service, check=False)
        resolved = out.split()[0] if out else None
        if not alias_ok or resolved != ip:
            self.fail(f"after reconnecting, {service} is at {ip} but {other} resolves "
                      f"{service} to {resolved} (alias kept: {alias_ok})")
        return resolved

    # -- Admin API ------------------------------------------------------------------------------

    def admin_get(self, n, path, timeout=2.0):
        """(HTTP status, JSON) from replica n's admin API; (None, error) when unreachable."""
        req = urllib.request.Request(self.admin_urls[n] + path,
                                     headers={"Authorization": f"Bearer {self.tokens[n]}"})
        try:
            with self.no_proxy.open(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")
        except (OSError, ValueError) as e:
            return None, str(e)

    def read_tokens(self):
        for n in REPLICAS:
            tok = self.docker("exec", self.cid(f"clc-{n}"), "cat", "/var/lib/canopy/clc/admin-token")
            if not tok:
                raise DrillError(f"clc-{n} has no admin token")
            self.tokens[n] = tok

    def views(self, replicas=REPLICAS):
        """Each replica's own Raft view (GET /v1/replica, never forwarded); None if unreachable."""
        futs = {n: self.pool.submit(self.admin_get, n, "/v1/replica", 1.5) for n in replicas}
        out = {}
        for n, f in futs.items():
            status, body = f.result()
            out[n] = body if status == 200 else None
        return out

    @staticmethod
    def agreed_leader(views):
        """The leader a majority of the group agrees on at the highest term, else None."""
        seen = [v for v in views.values() if v]
        if not seen:
            return None, None
        term = max(v["term"] for v in seen)
        votes = collections.Counter(v["leader"] for v in seen if v["term"] == term and v["leader"])
        for leader, count in votes.items():
            lv = views.get(leader)
            if count >= 2 and lv and lv["role"] == "leader" and lv["term"] == term:
                return leader, term
        return None, term

    def leader_get(self, path, leader=None):
        order = ([leader] if leader else []) + [n for n in REPLICAS if n != leader]
        for n in order:
            status, body = self.admin_get(n, path, timeout=3.0)
            if status == 200:
                return body
        return None

    def lab_status(self, zones_needed=True):
        """(leader, term, what is not healthy yet: list of strings)."""
        problems = []
        for svc, c in sorted(self.containers().items()):
            if not c["running"]:
                problems.append(f"{svc} not running")
            elif self.network not in c["networks"]:
                problems.append(f"{svc} not on {self.network}")
        views = self.views()
        leader, term = self.agreed_leader(views)
        for n, v in views.items():
            if v is None:
                problems.append(f"clc-{n} admin API unreachable")
            elif term is not None and (v["term"] != term or v["leader"] != leader):
                problems.append(f"clc-{n} at term {v['term']} follows {v['leader']}")
        if leader is None:
            problems.append("no agreed leader")
        else:
            lv = views[leader]
            for m in lv["members"]:
                if not m["voter"]:
                    problems.append(f"clc-{m['id']} is not a voter")
                elif m["id"] != leader and (m["lag"] is None or m["lag"] > self.args.max_lag):
                    problems.append(f"clc-{m['id']} lags {m['lag']} entries")
            if zones_needed:
                zones = self.leader_get("/v1/zones", leader) or []
                nodes = self.leader_get("/v1/nodes", leader) or []
                if not zones:
                    problems.append("no zones listed")
                problems += [f"zone {z['zone']} unavailable" for z in zones if not z["available"]]
                problems += [f"node {x['node_id']} unhealthy" for x in nodes if not x["healthy"]]
                if len(nodes) < self.args.nodes:
                    problems.append(f"{len(nodes)}/{self.args.nodes} nodes registered")
        return leader, term, problems

    def wait_healthy(self, what, bound=None):
        """Polls until the whole lab is healthy twice in a row; returns the seconds it took."""
        bound = bound or self.args.recover_bound
        t0 = now()
        streak, problems = 0, ["not polled"]
        self.waited_for = []  # what the lab was waited for, in order
        while now() - t0 < bound:
            leader, _, problems = self.lab_status()
            for p in problems:
                if p not in self.waited_for:
                    self.waited_for.append(p)
            streak = streak + 1 if not problems else 0
            if streak >= 2:
                return now() - t0, leader
            time.sleep(0.25)
        raise DrillError(f"{what}: the lab was not healthy within {bound:.0f}s: {', '.join(problems)}")

    def wait_leader(self, bound=None):
        bound = bound or self.args.recover_bound
        t0 = now()
        while now() - t0 < bound:
            leader, term = self.agreed_leader(self.views())
            if leader:
                return leader, term
            time.sleep(0.1)
        raise DrillError(f"no leader within {bound:.0f}s")

    # -- EC2 ------------------------------------------------------------------------------------

    def ec2_clients(self, read_timeout=None):
        """One client per replica, for one thread; the SDK's own retries are off (the drill
        retries, and counts), and every call fails over to the next replica on an error."""
        session = boto3.session.Session(
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env.get("AWS_DEFAULT_REGION", "canopy-1"))
        cfg = Config(retries={"mode": "standard", "total_max_attempts": 1},
                     connect_timeout=self.args.connect_timeout,
                     read_timeout=read_timeout or self.args.read_timeout,
                     max_pool_connections=4)
        return [session.client("ec2", endpoint_url=self.ec2_urls[n], config=cfg) for n in REPLICAS]

    def call(self, op, clients, state, fn, rng, bound=None):
        """fn(client) through state['ep']'s replica, retried (moving to the next replica) on
        errors an SDK retries, until acknowledged or `bound` seconds; returns (result, when
        the acknowledged attempt was sent, replica)."""
        deadline = now() + (bound or self.args.op_bound)
        stats = self.stats
        attempt = 0
        while True:
            attempt += 1
            i = state["ep"]
            sent = now()
            with stats.lock:
                stats.attempts[op] += 1
                if attempt > 1:
                    stats.retries[op] += 1
            try:
                result = fn(clients[i])
                with stats.lock:
                    stats.calls.append((sent, now(), REPLICAS[i], op, "ok"))
                    stats.acked[op] += 1
                    stats.by_endpoint[REPLICAS[i]] += 1
                return result, sent, REPLICAS[i]
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                code, status, retryable = classify(e)
                failed, replica, phase = now(), REPLICAS[i], self.phase
                msg = (e.response.get("Error", {}).get("Message", "")
                       if isinstance(e, botocore.exceptions.ClientError) else str(e))
                with stats.lock:
                    stats.calls.append((sent, failed, replica, op, code))
                    stats.errors[(op, code, status, retryable)] += 1
                    stats.error_phases[(op, code)][phase] += 1
                    stats.error_via[(op, code)][replica] += 1
                    stats.error_sample.setdefault((op, code), msg[:300])
                    if code == "InsufficientInstanceCapacity":
                        stats.held_when_refused.append(self.held)
                    if (isinstance(e, botocore.exceptions.ReadTimeoutError)
                            and clients[i].meta.config.read_timeout > SERVER_WAIT):
                        stats.timeouts.append((sent, failed, replica, op, phase))
                if not retryable:
                    raise NonRetryable(code, f"{msg} (via clc-{replica})")
                if now() >= deadline:
                    with stats.lock:
                        stats.gave_up[op] += 1
                    raise GaveUp(code, bound or self.args.op_bound)
                state["ep"] = (i + 1) % len(REPLICAS)
                time.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0) * rng.uniform(0.5, 1.0))

    # -- The workload ---------------------------------------------------------------------------

    def worker(self, w):
        rng = random.Random(f"{self.args.seed}/{w}")
        clients = self.ec2_clients()
        state = {"ep": w % len(REPLICAS)}
        live, known, tokens = [], collections.deque(maxlen=20), collections.deque(maxlen=5)
        seq = 0
        lo, hi = self.args.think
        while not self.stop.is_set():
            try:
                r = rng.random()
                if live and (len(live) >= self.args.max_live or r < 0.25):
                    self.op_terminate(clients, state, rng, live)
                elif r < 0.65:
                    seq += 1
                    self.op_run(w, seq, clients, state, rng, live, known, tokens)
                else:
                    self.op_describe(clients, state, rng, known, tokens)
            except Exception as e:  # a bug in the drill itself: report it, keep the thread
                self.fail(f"worker {w}: {type(e).__name__}: {e}")
                time.sleep(0.5)
            # A client spreads its calls over the endpoints it knows.
            if rng.random() < 0.2:
                state["ep"] = (state["ep"] + 1) % len(REPLICAS)
            time.sleep(rng.uniform(lo, hi))

    def prober(self):
        """One more client, for the failover times: a launch, then its termination, again and
        again, each call through the next replica, with a short read timeout (--probe-timeout)
        so that a call the cloud holds delays the measurement by that much at most."""
        rng = random.Random(f"{self.args.seed}/probe")
        clients = self.ec2_clients(read_timeout=self.args.probe_timeout)
        state = {"ep": 0}
        live, known, tokens = [], collections.deque(maxlen=1), collections.deque(maxlen=1)
        seq = 0
        while not self.stop.is_set():
            try:
                if live:
                    self.op_terminate(clients, state, rng, live)
                else:
                    seq += 1
                    self.op_run("p", seq, clients, state, rng, live, known, tokens, count=1)
            except Exception as e:
                self.fail(f"prober: {type(e).__name__}: {e}")
                time.sleep(0.5)
            state["ep"] = (state["ep"] + 1) % len(REPLICAS)
            time.sleep(0.02)

    def op_run(self, w, seq, clients, state, rng, live, known, tokens, count=None):
        token = f"drill-{self.run_id}-w{w}-{seq}"
        count = count or rng.choice((1, 1, 2))
        itype = rng.choice(("t2.nano", "t2.micro"))
        entry = {"count": count, "type": itype, "acked": False, "outcome": "in flight"}
        with self.ledger.lock:
            self.ledger.tokens[token] = entry

        def fn(c):
            return c.run_instances(
                ImageId=self.image_id, InstanceType=itype, MinCount=count, MaxCount=count,
                ClientToken=token,
                TagSpecifications=[{"ResourceType": "instance",
                                    "Tags": [{"Key": "canopy-drill", "Value": self.run_id}]}])
        try:
            r, sent, replica = self.call("RunInstances", clients, state, fn, rng)
        except (NonRetryable, GaveUp) as e:
            entry["outcome"] = str(e)
            self.fail(f"RunInstances {token}: {e}")
            return
        acked = now()
        ids = [i["InstanceId"] for i in r["Instances"]]
        with self.ledger.lock:
            entry.update(acked=True, outcome="acknowledged", reservation=r["ReservationId"],
                         instances=ids, acked_at=acked)
            for i in ids:
                self.ledger.owner[i] = token
        with self.stats.lock:
            self.stats.instances_launched += len(ids)
            self.held += len(ids)
        self.stats.write_acked(sent, acked, replica)
        if len(ids) != count:
            self.fail(f"RunInstances {token} asked for {count} instances, got {ids}")
        bad = [i["InstanceId"] for i in r["Instances"] if i.get("ClientToken") != token]
        if bad:
            self.fail(f"RunInstances {token} answered instances with another client token: {bad}")
        live.extend(ids)
        known.extend(ids)
        tokens.append((token, r["ReservationId"], sorted(ids)))

    def op_terminate(self, clients, state, rng, live):
        iid = live.pop(rng.randrange(len(live)))
        try:
            r, sent, replica = self.call("TerminateInstances", clients, state,
                                         lambda c: c.terminate_instances(InstanceIds=[iid]), rng)
        except (NonRetryable, GaveUp) as e:
            with self.ledger.lock:
                self.ledger.terminate_unsure.add(iid)
            self.fail(f"TerminateInstances {iid} (launch acknowledged): {e}")
            return
        acked = now()
        with self.ledger.lock:
            self.ledger.terminated[iid] = acked
        with self.stats.lock:
            self.held -= 1
        self.stats.write_acked(sent, acked, replica)
        got = [(t["InstanceId"], t["CurrentState"]["Name"]) for t in r.get("TerminatingInstances", [])]
        if [g[0] for g in got] != [iid] or got[0][1] not in ("shutting-down", "terminated"):
            self.fail(f"TerminateInstances {iid} answered {got}")

    def op_describe(self, clients, state, rng, known, tokens):
        kind = rng.random()
        if kind < 0.5 and known:
            ids = rng.sample(list(known), min(len(known), 4))
            try:
                r, _, replica = self.call(
                    "DescribeInstances", clients, state,
                    lambda c: c.describe_instances(InstanceIds=ids), rng)
            except NonRetryable as e:
                # EC2's describe calls are eventually consistent; the checker decides later
                # whether an acknowledged instance is really missing.
                self.warn(f"DescribeInstances {ids} right after they were acknowledged: {e}")
                return
            except GaveUp as e:
                self.fail(f"DescribeInstances: {e}")
                return
            got = {i["InstanceId"] for res in r["Reservations"] for i in res["Instances"]}
            if got != set(ids):
                self.warn(f"DescribeInstances {ids} (via clc-{replica}) answered {sorted(got)}")
        elif kind < 0.9 and tokens:
            token, rid, ids = rng.choice(list(tokens))
            try:
                r, _, replica = self.call(
                    "DescribeInstances", clients, state,
                    lambda c: c.describe_instances(
                        Filters=[{"Name": "client-token", "Values": [token]}]), rng)
            except (NonRetryable, GaveUp) as e:
                self.fail(f"DescribeInstances client-token={token}: {e}")
                return
            got = [(res["ReservationId"], sorted(i["InstanceId"] for i in res["Instances"]))
                   for res in r["Reservations"]]
            if len(got) > 1:
                self.fail(f"client token {token}: {len(got)} reservations {got} (duplicate launch)")
            elif got != [(rid, ids)]:
                self.warn(f"client token {token} (via clc-{replica}): {got}, acknowledged {rid} {ids}")
        else:
            try:
                self.call("DescribeInstances", clients, state,
                          lambda c: c.describe_instances(MaxResults=50), rng)
            except (NonRetryable, GaveUp) as e:
                self.fail(f"DescribeInstances: {e}")

    # -- Faults ---------------------------------------------------------------------------------

    def pick_follower(self, leader):
        return min(n for n in REPLICAS if n != leader)

    def wait_new_leader(self, old, t0, others):
        """When a replica other than `old` is agreed on as leader by the replicas in `others`."""
        while now() - t0 < self.args.recover_bound:
            views = self.views(others)
            leader, term = self.agreed_leader(views)
            if leader and leader != old:
                return leader, now() - t0
            time.sleep(0.05)
        self.fail(f"no new leader among clc-{others} within {self.args.recover_bound:.0f}s")
        return None, None

    def wait_first_write(self, t0, label):
        while now() - t0 < self.args.recover_bound:
            first = self.stats.first_write(t0)
            if first:
                return first[0] - t0, first[1]
            time.sleep(0.05)
        self.fail(f"{label}: no write acknowledged within {self.args.recover_bound:.0f}s")
        return None, None

    def hold(self, until):
        while now() < until and not self.stop.is_set():
            time.sleep(0.05)

    def settle(self, rec):
        """A dwell on the healed lab, ending only once writes are acknowledged again."""
        t = now()
        self.hold(t + self.args.settle)
        while self.stats.writes_after(t) < 3 and now() - t < self.args.recover_bound:
            time.sleep(0.05)
        if self.stats.writes_after(t) < 3:
            self.fail(f"{rec['fault']}: fewer than 3 writes acknowledged in the "
                      f"{self.args.recover_bound:.0f}s after recovery")

    def run_fault(self, fault):
        leader, term = self.wait_leader()
        rec = {"fault": fault, "term_before": term}
        log(f"--- {fault} (leader clc-{leader}, term {term})")
        self.phase = fault
        if fault in ("kill-leader", "partition-leader", "partition-follower"):
            target = leader if fault != "partition-follower" else self.pick_follower(leader)
            svc = f"clc-{target}"
            others = [n for n in REPLICAS if n != target]
            rec["target"] = svc
            if fault == "kill-leader":
                self.kill(svc)
            else:
                self.disconnect(svc)
            # From when docker is done: a call sent earlier may still be served by the target.
            t0 = now()
            log(f"{fault}: {svc} {'killed' if fault == 'kill-leader' else 'disconnected'}")
            if target == leader:
                rec["new_leader"], rec["election_s"] = self.wait_new_leader(leader, t0, others)
                rec["failover_s"], via = self.wait_first_write(t0, fault)
                log(f"{fault}: new leader clc-{rec['new_leader']} after {rec['election_s'] or 0:.2f}s, "
                    f"first write acknowledged after {rec['failover_s'] or 0:.2f}s (via clc-{via})")
            else:
                rec["first_write_s"], via = self.wait_first_write(t0, fault)
            self.hold(t0 + self.args.hold)
            t_heal = now()
            if fault == "kill-leader":
                self.start(svc)
            else:
                self.reconnect(svc)
                rec["dns"] = self.dns_check(svc)
            log(f"{fault}: {svc} {'started' if fault == 'kill-leader' else 'reconnected'}")
        elif fault == "kill-nc":
            svc = self.args.nc
            rec["target"] = svc
            self.kill(svc)
            t0 = now()
            log(f"kill-nc: {svc} killed, down for {self.args.node_hold:.0f}s")
            rec["first_write_s"], _ = self.wait_first_write(t0, fault)
            self.hold(t0 + self.args.node_hold)
            t_heal = now()
            self.start(svc)
            log(f"kill-nc: {svc} started")
        elif fault == "restart-zone":
            zone = self.args.zone
            zones = self.leader_get("/v1/zones", leader) or []
            nodes = self.leader_get("/v1/nodes", leader) or []
            cc = [z["endpoint"].split("//")[-1].split(":")[0] for z in zones if z["zone"] == zone]
            ncs = sorted(x["node_id"] for x in nodes if x["zone"] == zone)
            if not cc:
                raise DrillError(f"restart-zone: no zone {zone} (zones: {[z['zone'] for z in zones]})")
            services = cc + ncs
            rec["target"] = f"{zone} ({' '.join(services)})"
            self.stop_gracefully(services)
            t0 = now()
            log(f"restart-zone: {' '.join(services)} stopped, down for {self.args.node_hold:.0f}s")
            rec["first_write_s"], _ = self.wait_first_write(t0, fault)
            self.hold(t0 + self.args.node_hold)
            t_heal = now()
            self.start(*services)
            log(f"restart-zone: {' '.join(services)} started")
        else:
            raise DrillError(f"unknown fault {fault}")
        self.phase = f"{fault} healed"
        _, new = self.wait_healthy(fault)
        rec["recovery_s"] = now() - t_heal
        rec["waited_for"] = self.waited_for
        _, rec["term_after"] = self.wait_leader()
        log(f"{fault}: healthy {rec['recovery_s']:.2f}s after the heal (leader clc-{new}, "
            f"term {rec['term_after']})" + (f"; waited for: {', '.join(self.waited_for)}"
                                             if self.waited_for else ""))
        self.settle(rec)
        # Calls through the replicas the fault did not touch should end (answer, or 503)
        # within the replicas' wait bound, whatever happened to the others.
        untouched = [n for n in REPLICAS if f"clc-{n}" != rec["target"]]
        slow = self.stats.slowest(t0 - 1.0, t_heal, exclude=[n for n in REPLICAS if n not in untouched])
        if slow:
            sent, ended, replica, op, outcome = slow
            rec["slowest_call"] = {"seconds": round(ended - sent, 2), "replica": f"clc-{replica}",
                                   "op": op, "outcome": outcome, "sent_s": round(sent - t0, 2)}
            if ended - sent > SERVER_WAIT + 1.0:
                self.findings.append(
                    f"{fault}: a {op} sent through clc-{replica} (untouched) {sent - t0:+.2f}s from the "
                    f"injection took {ended - sent:.1f}s ({outcome}), past the replicas' "
                    f"{SERVER_WAIT:.0f}s wait bound")
        rec["gap_during_s"] = self.stats.max_gap(t0, t_heal)
        rec["gap_after_s"] = self.stats.max_gap(t_heal, now())
        failover = rec.get("failover_s")
        if failover is not None and failover > self.args.max_failover:
            self.fail(f"{fault}: the first write took {failover:.1f}s after the leader was lost "
                      f"(--max-failover {self.args.max_failover:.0f}s)")
        self.faults.append(rec)

    # -- The checker ----------------------------------------------------------------------------

    def all_instances(self, clients, state, rng, **kw):
        if "InstanceIds" not in kw:
            kw["PaginationConfig"] = {"PageSize": 500}

        def fn(c):
            out = []
            for page in c.get_paginator("describe_instances").paginate(**kw):
                for res in page["Reservations"]:
                    for i in res["Instances"]:
                        out.append((res["ReservationId"], i))
            return out
        r, _, _ = self.call("DescribeInstances", clients, state, fn, rng, bound=self.args.check_bound)
        return r

    def check(self):
        log("--- checker")
        self.phase = "checker"
        clients, state, rng = self.ec2_clients(), {"ep": 0}, random.Random(self.args.seed)
        try:
            self.wait_healthy("before the check")
        except DrillError as e:
            self.fail(str(e))
        prefix = f"drill-{self.run_id}-"
        with self.ledger.lock:
            tokens = dict(self.ledger.tokens)
            terminated = dict(self.ledger.terminated)
            unsure = set(self.ledger.terminate_unsure)
            owner = dict(self.ledger.owner)
        acked = {t: e for t, e in tokens.items() if e["acked"]}

        # 1. The client tokens, through the client-token filter (many values a call).
        by_token = collections.defaultdict(dict)  # token -> reservation -> ids
        names = sorted(tokens)
        for k in range(0, len(names), 100):
            batch = names[k:k + 100]
            for rid, i in self.all_instances(clients, state, rng,
                                             Filters=[{"Name": "client-token", "Values": batch}]):
                by_token[i.get("ClientToken")].setdefault(rid, set()).add(i["InstanceId"])
        dup = {t: r for t, r in by_token.items() if len(r) > 1}
        for t, r in sorted(dup.items()):
            self.fail(f"client token {t}: {len(r)} reservations {sorted(r)} (a duplicated launch)")
        for t, e in sorted(acked.items()):
            got = by_token.get(t, {})
            if not got:
                self.fail(f"client token {t}: acknowledged {e['reservation']} {e['instances']}, "
                          "but no instance has it (lost launch)")
            elif t not in dup and got != {e["reservation"]: set(e["instances"])}:
                self.fail(f"client token {t}: acknowledged {e['reservation']} {e['instances']}, "
                          f"the cloud holds {({r: sorted(v) for r, v in got.items()})}")
        unacked = {t for t in tokens if t not in acked}
        unacked_launched = {t for t in unacked if by_token.get(t)}

        # 2. Every instance: settled, in the state the client asked for, nothing unexpected.
        t0 = now()
        while True:
            everything = self.all_instances(clients, state, rng)
            mine = {i["InstanceId"]: (rid, i) for rid, i in everything
                    if (i.get("ClientToken") or "").startswith(prefix)}
            moving = {iid: i["State"]["Name"] for iid, (_, i) in mine.items()
                      if i["State"]["Name"] in TRANSITIONAL}
            if not moving or now() - t0 > self.args.check_bound:
                break
            time.sleep(0.5)
        settle_s = now() - t0
        for iid, st in sorted(moving.items()):
            self.fail(f"{iid} still {st} {self.args.check_bound:.0f}s after the workload stopped")
        unexpected = [(rid, i["InstanceId"], i.get("ClientToken")) for rid, i in everything
                      if i["InstanceId"] not in self.baseline and i["InstanceId"] not in mine]
        for rid, iid, tok in unexpected:
            self.fail(f"{iid} ({rid}, client token {tok!r}) appeared but the drill did not launch it")
        for iid, (rid, i) in sorted(mine.items()):
            tok = i.get("ClientToken")
            if tok not in tokens:
                self.fail(f"{iid} carries client token {tok}, which the drill never sent")
        admin = {v["instance_id"]: v for v in (self.leader_get("/v1/instances") or [])}
        nodes = {(x["zone"], x["node_id"]): x for x in (self.leader_get("/v1/nodes") or [])}
        if not admin or not nodes:
            self.fail("the admin API did not list instances and nodes")
        lost, running, terminated_ok = [], 0, 0
        for t, e in acked.items():
            for iid in e["instances"]:
                if iid not in mine:
                    lost.append(iid)
        for iid in lost:
            self.fail(f"{iid} (token {owner.get(iid)}) was acknowledged but DescribeInstances "
                      "does not list it (lost)")
        for iid, (rid, i) in sorted(mine.items()):
            st = i["State"]["Name"]
            reason = (i.get("StateReason") or {}).get("Message", "")
            if iid in terminated:
                if st != "terminated" and st not in TRANSITIONAL:
                    self.fail(f"{iid}: TerminateInstances acknowledged, but it is {st} {reason}")
                elif st == "terminated":
                    terminated_ok += 1
            elif iid in unsure:
                pass
            elif st == "running":
                running += 1
                a = admin.get(iid)
                zone = i["Placement"]["AvailabilityZone"]
                node = a and a.get("node_id")
                if not node:
                    self.fail(f"{iid} is running in {zone} but on no node ({a})")
                elif (zone, node) not in nodes:
                    self.fail(f"{iid} is running on {zone}/{node}, which the admin API does not list")
                elif not nodes[(zone, node)]["healthy"]:
                    self.fail(f"{iid} is running on {zone}/{node}, which is unhealthy")
                elif a["state"] != "running" or a["desired"] != "running":
                    self.fail(f"{iid}: DescribeInstances says running, the admin API {a['state']}"
                              f" (desired {a['desired']})")
            elif st not in TRANSITIONAL:
                self.fail(f"{iid} is {st} ({reason!r}) though the drill never terminated it")
        self.checked = {
            "tokens": len(tokens), "acknowledged": len(acked), "unacknowledged": len(unacked),
            "unacknowledged_launched": len(unacked_launched), "instances": len(mine),
            "terminated": terminated_ok, "running": running, "lost": len(lost),
            "duplicated_tokens": len(dup), "unexpected": len(unexpected),
            "settled_s": round(settle_s, 2),
        }

        # 3. Every replica serves the whole listing, unpaginated, as `aws ec2
        # describe-instances` and boto3's describe_instances() ask for it, and the same one.
        self.list_through_each(set(mine))

        # 4. Clean up: terminate what is left, and see it go.
        left = [iid for iid, (_, i) in mine.items() if i["State"]["Name"] not in ("terminated",)]
        if left and not self.args.keep_instances:
            for k in range(0, len(left), 200):
                batch = left[k:k + 200]
                try:
                    self.call("TerminateInstances", clients, state,
                              lambda c: c.terminate_instances(InstanceIds=batch), rng,
                              bound=self.args.check_bound)
                except (NonRetryable, GaveUp) as e:
                    self.fail(f"cleanup: TerminateInstances: {e}")
            t0 = now()
            while True:
                states = collections.Counter()
                for k in range(0, len(left), 200):
                    states.update(i["State"]["Name"] for _, i in self.all_instances(
                        clients, state, rng, InstanceIds=left[k:k + 200]))
                if set(states) <= {"terminated"} or now() - t0 > self.args.check_bound:
                    break
                time.sleep(0.5)
            if set(states) - {"terminated"}:
                self.fail(f"cleanup: not all terminated after {self.args.check_bound:.0f}s: {dict(states)}")
            self.checked["cleanup_terminated"] = len(left)
            self.checked["cleanup_s"] = round(now() - t0, 2)

        # 5. The replicas' state machines.
        self.check_digests()

    def list_through_each(self, mine):
        """DescribeInstances without MaxResults through each replica, up to 3 attempts on
        that replica alone (an SDK's default): each must answer, with the same instances."""
        seen, sizes = {}, {}
        for idx, n in enumerate(REPLICAS):
            client = self.ec2_clients()[idx]
            got = []
            client.meta.events.register(
                "after-call.ec2.DescribeInstances",
                lambda http_response, **kw: got.append(len(http_response.content or b"")))
            for attempt in range(3):
                try:
                    r = client.describe_instances()
                    seen[n] = {i["InstanceId"] for res in r["Reservations"]
                               for i in res["Instances"]} & mine
                    sizes[n] = got[-1] if got else 0
                    break
                except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
                    code, status, _ = classify(e)
                    msg = (e.response.get("Error", {}).get("Message", "")
                           if isinstance(e, botocore.exceptions.ClientError) else str(e))
                    time.sleep(0.5)
            else:
                self.fail(f"DescribeInstances (whole account, unpaginated) through clc-{n} failed "
                          f"3 times: {code} {status or ''}: {msg[:200]}")
        if len({frozenset(v) for v in seen.values()}) > 1:
            self.fail("the replicas list different instances: " + ", ".join(
                f"clc-{n} {len(v)}" for n, v in sorted(seen.items())))
        self.checked["listing"] = ", ".join(
            f"clc-{n} {sizes[n] / 1e6:.1f} MB" if n in seen else f"clc-{n} FAILED" for n in REPLICAS)

    def check_digests(self):
        """Samples every replica's digest until all three were seen at one applied index;
        replicas at the same index must hold the same sha256."""
        t0 = now()
        seen = collections.defaultdict(dict)  # applied index -> replica -> sha256
        rows, tables, last = {}, {}, {}  # last: replica -> its last answer (index, or why none)
        while now() - t0 < self.args.digest_bound:
            futs = {n: self.pool.submit(self.admin_get, n, "/v1/replica/digest", 5.0) for n in REPLICAS}
            for n, f in futs.items():
                status, body = f.result()
                if status == 404:
                    self.digest_result = ("SKIPPED: /v1/replica/digest answered 404 on "
                                          f"clc-{n} (the binary predates it: rebuild "
                                          "target/release/canopy and rerun up.sh)")
                    log("digest check " + self.digest_result)
                    return
                if status != 200:
                    last[n] = f"no answer ({status}: {str(body)[:80]})"
                    continue
                last[n] = f"at {body['applied_index']}"
                seen[body["applied_index"]][n] = body["sha256"]
                rows[(body["applied_index"], n)] = body.get("rows", {})
                tables[(body["applied_index"], n)] = body.get("tables", {})
            for idx, shas in seen.items():
                if len(set(shas.values())) > 1:
                    names = sorted({t for n in shas for t in tables.get((idx, n), {})})
                    differ = [t for t in names
                              if len({tables.get((idx, n), {}).get(t) for n in shas}) > 1]
                    detail = "; ".join(
                        f"clc-{n} {s[:16]} rows {rows.get((idx, n))}" for n, s in sorted(shas.items()))
                    detail += f"; tables that differ: {differ or 'unknown'}"
                    self.digest_result = f"FAILED: replicas diverge at applied index {idx}: {detail}"
                    self.fail("replica digests " + self.digest_result)
                    return
            full = [idx for idx, shas in seen.items() if len(shas) == len(REPLICAS)]
            if full:
                idx = max(full, key=lambda x: -1 if x is None else x)
                sha = next(iter(seen[idx].values()))
                compared = sum(1 for s in seen.values() if len(s) > 1)
                self.digest_result = (f"OK: clc-1, clc-2, clc-3 at applied index {idx} hold sha256 "
                                      f"{sha[:16]}… ({compared} index(es) compared, "
                                      f"{sum(rows[(idx, 1)].values())} rows)")
                log("digests " + self.digest_result)
                return
            time.sleep(0.2)
        self.digest_result = (f"FAILED: the replicas were never all at one applied index within "
                              f"{self.args.digest_bound:.0f}s; last: " + ", ".join(
                                  f"clc-{n} {last.get(n, 'not asked')}" for n in REPLICAS))
        self.fail("replica digests " + self.digest_result)

    # -- The run --------------------------------------------------------------------------------

    def preflight(self):
        svcs = self.containers()
        if len([s for s in svcs if s.startswith("clc-")]) != len(REPLICAS):
            raise DrillError(f"the lab is not up (containers: {sorted(svcs)}): run deploy/lab/up.sh")
        self.heal()
        self.read_tokens()
        secs, leader = self.wait_healthy("preflight", bound=self.args.recover_bound)
        log(f"lab healthy (leader clc-{leader}); run {self.run_id}")
        clients, state, rng = self.ec2_clients(), {"ep": 0}, random.Random(0)
        images, _, _ = self.call("DescribeImages", clients, state,
                                 lambda c: c.describe_images(), rng)
        machine = [i for i in images["Images"] if i["ImageId"].startswith("ami-")
                   and i.get("State", "available") == "available"]
        if not machine:
            raise DrillError("no available machine image (ami-…) to launch")
        self.image_id = machine[0]["ImageId"]
        nodes = self.leader_get("/v1/nodes") or []
        self.capacity = (f"the nodes have {sum(x['capacity']['vcpus'] for x in nodes)} vCPUs, "
                         f"{sum(x['allocated']['vcpus'] for x in nodes)} allocated before the drill")
        self.baseline = {i["InstanceId"] for _, i in self.all_instances(clients, state, rng)}
        log(f"image {self.image_id}; {len(self.baseline)} instance(s) already in the account")

    def run(self):
        started = now()
        threads = []
        try:
            self.preflight()
            self.stats = Stats()  # the workload's own counts
            for w in range(self.args.threads):
                t = threading.Thread(target=self.worker, args=(w,), name=f"worker-{w}", daemon=True)
                t.start()
                threads.append(t)
            if self.args.probe_timeout > 0:
                t = threading.Thread(target=self.prober, name="prober", daemon=True)
                t.start()
                threads.append(t)
            log(f"workload: {self.args.threads} threads and a prober against clc-1, clc-2, clc-3")
            self.phase = "warm-up"
            t_load = now()
            self.hold(t_load + self.args.warmup)
            if self.stats.writes_after(t_load) == 0:
                raise DrillError(f"no write acknowledged in the {self.args.warmup:.0f}s warm-up")
            for fault in self.args.faults:
                self.run_fault(fault)
        except DrillError as e:
            self.fail(f"drill aborted: {e}")
        except KeyboardInterrupt:
            self.fail("interrupted")
            self.heal()
            raise
        finally:
            self.stop.set()
            if self.broken:
                log(f"healing what the drill left broken: {self.broken}")
                self.heal()
            for t in threads:
                t.join(self.args.op_bound + 2 * self.args.read_timeout)
                if t.is_alive():
                    self.fail(f"{t.name} did not finish its last call")
            self.workload_secs = now() - started
        self.load_stats = self.stats
        self.stats = Stats()  # the checker's calls, counted apart
        self.findings += self.hung_calls()
        if threads:
            self.check()
        self.total_secs = now() - T0

    def hung_calls(self):
        """Calls that got no answer within the read timeout through a replica the drill had
        not touched meanwhile: the cloud held them past its own 5 s wait bound."""
        out = collections.Counter()
        for sent, failed, replica, op, phase in self.load_stats.timeouts:
            if phase in ALL_FAULTS:
                continue  # run_fault reports the slowest call of each fault's window
            svc = f"clc-{replica}"
            touched = any(s == svc and a <= failed and b >= sent for s, a, b in self.windows)
            touched |= svc in self._down_since and self._down_since[svc] <= failed
            if not touched:
                out[(phase, svc)] += 1
        return [f"{n} call(s) through {svc}, which the drill did not touch, got no answer within "
                f"the {self.args.read_timeout:.0f}s read timeout during {phase}"
                for (phase, svc), n in sorted(out.items())]

    # -- The summary ----------------------------------------------------------------------------

    def summary(self):
        s, c = self.load_stats, self.checked
        ok = not self.failures
        out = [f"== Canopy lab fault drill: {'PASS' if ok else 'FAIL'} "
               f"(run {self.run_id}, {self.total_secs:.1f}s; seed {self.args.seed}) =="]
        out.append(f"workload: {self.args.threads} threads"
                   f"{' and a prober' if self.args.probe_timeout > 0 else ''}, {self.workload_secs:.1f}s, "
                   f"endpoints clc-1/2/3 acknowledged {s.by_endpoint[1]}/{s.by_endpoint[2]}/{s.by_endpoint[3]} calls")
        ops = ", ".join(f"{op} {s.acked[op]}" for op in sorted(s.attempts))
        out.append(f"operations acknowledged: {ops}; instances launched {s.instances_launched}")
        out.append(f"attempts {sum(s.attempts.values())}, retries {sum(s.retries.values())} "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(s.retries.items())) or 'none'}), "
                   f"gave up {sum(s.gave_up.values())}")
        if s.errors:
            out.append("client-side errors (operation, code, HTTP status, does an AWS SDK retry it, "
                       "count; when; through which replica):")
            for (op, code, status, retry), n in sorted(s.errors.items()):
                when = ", ".join(f"{ph} {k}" for ph, k in s.error_phases[(op, code)].most_common())
                via = ", ".join(f"clc-{r} {k}" for r, k in sorted(s.error_via[(op, code)].items()))
                out.append(f"  {op:<18} {code:<28} {status or '-':<4} "
                           f"{'retryable' if retry else 'NOT RETRYABLE'} x{n}; {when}; {via}")
                if not retry or code == "InsufficientInstanceCapacity":
                    out.append(f"      e.g. {s.error_sample.get((op, code), '')}")
                if code == "InsufficientInstanceCapacity" and s.held_when_refused:
                    out.append(f"      the drill held {min(s.held_when_refused)}-{max(s.held_when_refused)} "
                               f"instances (1 vCPU each) when refused; {self.capacity}")
        else:
            out.append("client-side errors: none")
        out.append("faults (seconds from the injection; recovery from the heal):")
        for f in self.faults:
            parts = [f"{f['fault']:<18} {f.get('target', '')}"]
            if "failover_s" in f:
                parts.append(f"new leader clc-{f.get('new_leader')} elected {fmt(f.get('election_s'))}, "
                             f"first write acked {fmt(f.get('failover_s'))}")
            elif "first_write_s" in f:
                parts.append(f"first write acked {fmt(f.get('first_write_s'))}")
            parts.append(f"longest write gap {fmt(f.get('gap_during_s'))} during, "
                         f"{fmt(f.get('gap_after_s'))} after the heal")
            parts.append(f"healthy {fmt(f.get('recovery_s'))} after the heal")
            parts.append(f"term {f.get('term_before')}->{f.get('term_after')}")
            if f.get("dns"):
                parts.append(f"name resolves again ({f['dns']})")
            out.append("  " + "; ".join(parts))
            if f.get("slowest_call"):
                sc = f["slowest_call"]
                out.append(f"      slowest call through an untouched replica: {sc['op']} via "
                           f"{sc['replica']}, sent {sc['sent_s']:+.2f}s, {sc['seconds']:.2f}s, {sc['outcome']}")
            if f.get("waited_for") and (f.get("recovery_s") or 0) > 3:
                out.append(f"      healing waited for: {', '.join(f['waited_for'])}")
        if c:
            out.append(f"checked: {c['tokens']} client tokens ({c['acknowledged']} acknowledged, "
                       f"{c['unacknowledged']} not, {c['unacknowledged_launched']} of those launched), "
                       f"{c['duplicated_tokens']} with two reservations")
            out.append(f"         {c['instances']} instances: {c['running']} running on healthy nodes, "
                       f"{c['terminated']} terminated as asked, {c['lost']} lost, "
                       f"{c['unexpected']} unexpected; settled in {c['settled_s']}s"
                       + (f"; cleanup terminated {c['cleanup_terminated']} in {c['cleanup_s']}s"
                          if "cleanup_terminated" in c else ""))
            if "listing" in c:
                out.append(f"         whole-account DescribeInstances through each replica: {c['listing']}")
        out.append(f"replica digests: {self.digest_result}")
        cs = self.stats
        if cs.errors:
            out.append("the checker's own calls met errors (retried): " + "; ".join(
                f"{op} {code} x{n} ({cs.error_sample.get((op, code), '')[:160]})"
                for (op, code, _, _), n in sorted(cs.errors.items())))
        if self.findings:
            out.append(f"availability findings ({len(self.findings)}; not failures):")
            out += [f"  {x}" for x in self.findings]
        if self.warnings:
            out.append(f"warnings ({len(self.warnings)}):")
            out += [f"  {w}" for w in self.warnings[:20]]
        if self.failures:
            out.append(f"FAILURES ({len(self.failures)}):")
            out += [f"  {f}" for f in self.failures[:40]]
            if len(self.failures) > 40:
                out.append(f"  … and {len(self.failures) - 40} more")
        return "\n".join(out)

    def as_json(self):
        s = self.load_stats
        return {
            "pass": not self.failures, "run": self.run_id, "seconds": round(self.total_secs, 1),
            "acknowledged": dict(s.acked), "attempts": dict(s.attempts), "retries": dict(s.retries),
            "gave_up": dict(s.gave_up),
            "errors": [{"op": op, "code": code, "status": st, "sdk_retries": r, "count": n}
                       for (op, code, st, r), n in sorted(s.errors.items())],
            "by_endpoint": {f"clc-{k}": v for k, v in s.by_endpoint.items()},
            "faults": self.faults, "checked": self.checked, "digest": self.digest_result,
            "findings": self.findings, "warnings": self.warnings, "failures": self.failures,
        }


def fmt(x):
    return "-" if x is None else f"{x:.2f}s"


def parse_args(argv):
    env = os.environ.get
    p = argparse.ArgumentParser(
        description="Fault drill for the multi-node lab (deploy/lab/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--faults", default=env("CANOPY_DRILL_FAULTS", ",".join(ALL_FAULTS)),
                   help=f"comma-separated, in order, from: {', '.join(ALL_FAULTS)}")
    p.add_argument("--threads", type=int, default=int(env("CANOPY_DRILL_THREADS", "6")),
                   help="workload threads")
    p.add_argument("--think", default=env("CANOPY_DRILL_THINK", "0.05,0.25"),
                   help="pause between a thread's calls: MIN,MAX seconds")
    p.add_argument("--max-live", type=int, default=4,
                   help="instances a thread keeps before it terminates one")
    p.add_argument("--warmup", type=float, default=4.0, help="workload seconds before the first fault")
    p.add_argument("--hold", type=float, default=float(env("CANOPY_DRILL_HOLD", "5")),
                   help="seconds a CLC stays killed or partitioned")
    p.add_argument("--node-hold", type=float, default=float(env("CANOPY_DRILL_NODE_HOLD", "12")),
                   help="seconds the NC, and the zone, stay down (above the 10 s node and zone "
                        "timeouts, so the cloud notices)")
    p.add_argument("--settle", type=float, default=float(env("CANOPY_DRILL_SETTLE", "3")),
                   help="seconds of workload on the healed lab after each fault")
    p.add_argument("--nc", default="nc-a1", help="the NC kill-nc kills")
    p.add_argument("--zone", default="canopy-1b", help="the zone restart-zone restarts")
    p.add_argument("--nodes", type=int, default=4, help="NCs a healthy lab has")
    p.add_argument("--op-bound", type=float, default=45.0,
                   help="seconds one call may take, retries included, before the drill gives up on it")
    p.add_argument("--recover-bound", type=float, default=60.0,
                   help="seconds for a leader, a first write, or a healthy lab after a fault")
    p.add_argument("--check-bound", type=float, default=60.0,
                   help="seconds for instances to leave pending/stopping/shutting-down at the end")
    p.add_argument("--digest-bound", type=float, default=30.0,
                   help="seconds to see all three replicas' digests at one applied index")
    p.add_argument("--max-lag", type=int, default=20,
                   help="log entries a follower may lag and still count as caught up")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--read-timeout", type=float, default=10.0,
                   help="HTTP read timeout: above the replicas' 5 s wait for a leader, after which "
                        "they answer 503, so a call that times out was held by the cloud")
    p.add_argument("--probe-timeout", type=float, default=3.0,
                   help="the prober's read timeout (0: no prober; failover times then come from "
                        "the workload threads alone)")
    p.add_argument("--max-failover", type=float, default=30.0,
                   help="seconds from losing the leader to the first acknowledged write above "
                        "which the drill fails")
    p.add_argument("--seed", type=int, default=int(env("CANOPY_DRILL_SEED", "1")))
    p.add_argument("--keep-instances", action="store_true",
                   help="do not terminate the drill's instances at the end")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    p.add_argument("--canopyrc", default=os.path.join(LAB, "canopyrc"))
    p.add_argument("--port-prefix", default=env("CANOPY_LAB_PORT_PREFIX", "1"))
    p.add_argument("--project", default=env("COMPOSE_PROJECT_NAME", "canopy-lab"))
    a = p.parse_args(argv)
    a.faults = [f.strip() for f in a.faults.split(",") if f.strip()]
    bad = [f for f in a.faults if f not in ALL_FAULTS]
    if bad:
        p.error(f"unknown fault(s) {bad}; choose from {', '.join(ALL_FAULTS)}")
    a.think = tuple(float(x) for x in a.think.split(","))
    if len(a.think) != 2 or a.think[0] > a.think[1]:
        p.error("--think takes MIN,MAX")
    return a


def main(argv):
    args = parse_args(argv)
    try:
        drill = Drill(args)
    except DrillError as e:
        log(f"error: {e}")
        return 2
    try:
        drill.run()
    except KeyboardInterrupt:
        log("interrupted: the lab was healed; no check ran")
        return 130
    text = drill.summary()
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(drill.as_json(), f, indent=2, default=str)
    if not drill.checked:
        return 2  # the workload never ran: nothing was checked
    return 0 if not drill.failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
