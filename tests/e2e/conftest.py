"""End-to-end harness: runs the real `canopy dev` binary and talks to it with boto3, the
AWS CLI (v1) and raw HTTP, the way users and tools do.

The binary is not built here: set CANOPY_BIN, or build `cargo build -p canopy` so that
<repo>/target/debug/canopy (or $CARGO_TARGET_DIR/debug/canopy) exists.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import boto3
import botocore
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0
EC2_API_VERSION = "2016-11-15"
RC_KEYS = (
    "AWS_ENDPOINT_URL_EC2",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "CANOPY_ADMIN_ENDPOINT",
    "CANOPY_ADMIN_TOKEN",
)
# Client-side environment that would point the clients somewhere else.
_AWS_ENV_DROP = re.compile(
    r"^(AWS_(PROFILE|DEFAULT_PROFILE|SESSION_TOKEN|SECURITY_TOKEN|REGION|ENDPOINT_URL.*|"
    r"ROLE_ARN|WEB_IDENTITY_TOKEN_FILE|CONTAINER_.*|USE_FIPS_ENDPOINT|USE_DUALSTACK_ENDPOINT|"
    r"IGNORE_CONFIGURED_ENDPOINT_URLS|DATA_PATH|PAGER|CLI_.*)|CANOPY_.*)$"
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

WAIT = {"Delay": 1, "MaxAttempts": 60}
INSTANCE_ID_RE = re.compile(r"^i-[0-9a-f]{17}$")
RESERVATION_ID_RE = re.compile(r"^r-[0-9a-f]{17}$")

# Every cloud started in this session, for log dumps and last-resort cleanup.
_CLOUDS: list["Cloud"] = []
# Whether anything failed: then logs are dumped and the temp dir is kept.
_STATE = {"failed": False}


# --------------------------------------------------------------------------------------
# helpers


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: the kernel may
    give a just-released port again, and two servers told the same port lose one of them."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def find_binary() -> Path:
    env = os.environ.get("CANOPY_BIN")
    if env:
        path = Path(env)
    else:
        target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
        if not target.is_absolute():
            target = REPO / target
        path = target / "debug" / "canopy"
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"canopy binary not found at {path}: build it with `cargo build -p canopy` "
            "or point CANOPY_BIN at it",
            pytrace=False,
        )
    return path


def parse_canopyrc(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        key, sep, value = line[len("export ") :].partition("=")
        if not sep:
            continue
        words = shlex.split(value)
        out[key.strip()] = words[0] if words else ""
    return out


class Pki:
    """A cloud CA for processes started by hand (`canopy ca init` in `root/ca`), and the
    components' TLS directories it issues (`canopy ca issue`): every `canopy clc`, `cc` and
    `nc` outside `canopy dev` talks mutual TLS."""

    def __init__(self, binary, root: Path):
        self.binary = str(binary)
        self.root = Path(root)
        self.ca_dir = self.root / "ca"
        if not (self.ca_dir / "ca.key").exists():
            self._run("ca", "init", "--dir", str(self.ca_dir))

    def _run(self, *args: str) -> str:
        done = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"canopy {' '.join(args)} failed: {done.stderr}"
        return done.stdout

    def issue(self, role: str, name: str, *, with_ca_key: bool = False) -> str:
        """The TLS directory of `role`/`name` (made once), as a --tls-dir argument."""
        out = self.root / f"{role}-{name}"
        if not (out / "tls.crt").exists():
            self._run("ca", "issue", "--ca-dir", str(self.ca_dir), "--role", role, "--name", name,
                      "--out", str(out), *(["--with-ca-key"] if with_ca_key else []))
        return str(out)

    def fingerprint(self) -> str:
        return self._run("ca", "fingerprint", "--dir", str(self.ca_dir)).strip()


def _set_pdeathsig() -> None:
    """In the child: die with the parent (pytest killed hard must not leave a cloud behind)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def http_status(exc: botocore.exceptions.ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def expect_error(call, code: str, status: int | None = 400, *args, **kwargs):
    """Calls `call(*args, **kwargs)` and checks that it fails with EC2 error `code` and HTTP
    `status` (`None`: any), with a message. Returns the ClientError."""
    import pytest
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        call(*args, **kwargs)
    assert error_code(exc.value) == code, exc.value.response.get("Error")
    if status is not None:
        assert http_status(exc.value) == status, exc.value.response.get("ResponseMetadata")
    assert exc.value.response["Error"].get("Message"), "an error needs a message"
    return exc.value


def remove_volumes(ec2, volume_ids) -> None:
    """Test cleanup: force-detaches and deletes each volume, whatever state it is in."""
    for vid in volume_ids:
        for call in (lambda: ec2.detach_volume(VolumeId=vid, Force=True),
                     lambda: ec2.delete_volume(VolumeId=vid)):
            try:
                call()
            except botocore.exceptions.ClientError:
                pass


def eventually(fetch, ok, timeout: float = 15.0, interval: float = 0.3):
    """Calls fetch() until ok(value) holds or timeout passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: str):
        self.status = status
        self.headers = headers
        self.body = body

    def xml(self) -> ET.Element:
        return ET.fromstring(self.body)

    def error(self) -> tuple[str, str]:
        """(Code, Message) of an EC2 error body `<Response><Errors><Error>…`; fails if the body is not one."""
        try:
            root = self.xml()
        except ET.ParseError as e:
            raise AssertionError(f"error body is not XML ({e}): {self.body!r}") from None
        assert strip_ns(root.tag) == "Response", f"error root is <{root.tag}>, want <Response>: {self.body}"
        errors = [c for c in root if strip_ns(c.tag) == "Errors"]
        assert errors, f"no <Errors> in {self.body}"
        error = [c for c in errors[0] if strip_ns(c.tag) == "Error"]
        assert error, f"no <Error> in {self.body}"
        fields = {strip_ns(c.tag): (c.text or "") for c in error[0]}
        assert "Code" in fields, f"no <Code> in {self.body}"
        return fields["Code"], fields.get("Message", "")

    def __repr__(self) -> str:
        return f"RawResponse({self.status}, {self.body[:500]!r})"


class CliError(AssertionError):
    def __init__(self, args, proc: subprocess.CompletedProcess):
        self.proc = proc
        super().__init__(f"aws {' '.join(args)} exited {proc.returncode}\nstderr: {proc.stderr}\nstdout: {proc.stdout}")


# --------------------------------------------------------------------------------------
# the cloud


class Cloud:
    """One `canopy dev` process and everything a test needs to talk to it."""

    def __init__(self, binary: Path, data_dir: Path, zones=("canopy-1a",), nodes_per_zone: int = 1,
                 extra_env: dict[str, str] | None = None):
        self.binary = binary
        self.data_dir = data_dir
        self.zones = tuple(zones)
        self.nodes_per_zone = nodes_per_zone
        self.extra_env = dict(extra_env or {})
        self.ec2_port = free_port()
        self.admin_port = free_port()
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen | None = None
        self.rc: dict[str, str] = {}
        self.starts = 0
        self.last_exit: int | None = None
        self.owner: str | None = None  # nodeid of the test that made it; None for the shared cloud
        self._log_file = None
        self._client = None
        self._image_id = None
        # A private client config dir, so ~/.aws of whoever runs the suite plays no part.
        self.client_dir = data_dir.parent / f"{data_dir.name}-client"
        self.client_dir.mkdir(parents=True, exist_ok=True)
        self._write_fast_waiters()
        _CLOUDS.append(self)

    # ---- process lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> "Cloud":
        assert self.proc is None, "already running"
        for attempt in range(3):
            if self._start_once(timeout):
                return self
            # Lost a race for a port we picked: pick new ones (only before the first good start,
            # since a restart must keep its endpoint).
            if self.starts == 0 and "Address already in use" in self.log_text()[-4000:] and attempt < 2:
                self.ec2_port, self.admin_port = free_port(), free_port()
                continue
            break
        why = (f"exited with code {self.last_exit} before writing canopyrc" if self.last_exit is not None
               else f"did not write {self.data_dir / 'canopyrc'} within {timeout:.0f} s (killed)")
        pytest.fail(
            f"canopy dev {why}\n--- log {self.log_path} ---\n"
            + self.log_tail(200),
            pytrace=False,
        )

    def _start_once(self, timeout: float) -> bool:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        rc_path = self.data_dir / "canopyrc"
        cmd = [
            str(self.binary), "dev",
            "--data-dir", str(self.data_dir),
            "--ec2-listen", f"127.0.0.1:{self.ec2_port}",
            "--admin-listen", f"127.0.0.1:{self.admin_port}",
            "--zone", ",".join(self.zones),
            "--nodes-per-zone", str(self.nodes_per_zone),
            "--hypervisor", "sim",
        ]
        env = {k: v for k, v in os.environ.items() if not _AWS_ENV_DROP.match(k)}
        env["NO_COLOR"] = "1"
        env.update(self.extra_env)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== start #{self.starts + 1}: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        # canopy removes a stale canopyrc itself; remove it too so we never read last run's.
        rc_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            cwd=str(self.data_dir), start_new_session=True, preexec_fn=_set_pdeathsig,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reap()
                return False
            if rc_path.exists():
                rc = parse_canopyrc(rc_path.read_text())
                if all(k in rc for k in RC_KEYS):
                    self.rc = rc
                    self.starts += 1
                    self._client = None
                    return True
            time.sleep(0.05)
        self.kill()
        self.last_exit = None
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; SIGKILL the whole group if it does not stop. Returns the exit code
        (None if it had to be killed)."""
        if self.proc is None:
            return None
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        else:
            code = self.proc.returncode
        self._reap()
        return code

    def kill(self) -> None:
        """SIGKILL to the process group (the child is not reaped yet, so the group is still ours)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.last_exit = self.proc.returncode
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- connection details

    @property
    def endpoint(self) -> str:
        return self.rc["AWS_ENDPOINT_URL_EC2"]

    @property
    def region(self) -> str:
        return self.rc["AWS_DEFAULT_REGION"]

    @property
    def access_key(self) -> str:
        return self.rc["AWS_ACCESS_KEY_ID"]

    @property
    def secret_key(self) -> str:
        return self.rc["AWS_SECRET_ACCESS_KEY"]

    @property
    def admin_endpoint(self) -> str:
        return self.rc["CANOPY_ADMIN_ENDPOINT"]

    @property
    def admin_token(self) -> str:
        return self.rc["CANOPY_ADMIN_TOKEN"]

    @property
    def env(self) -> dict[str, str]:
        """The process environment with canopyrc applied, as a user who sourced it has."""
        env = {k: v for k, v in os.environ.items() if not _AWS_ENV_DROP.match(k)}
        env.update(self.rc)
        env.update({
            "AWS_CONFIG_FILE": str(self.client_dir / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.client_dir / "credentials"),
            "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "3",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_COLOR": "1",
        })
        return env

    # ---- clients

    def client(self, access_key: str | None = None, secret_key: str | None = None, **config):
        options = {"retries": {"mode": "standard", "max_attempts": 3}, "connect_timeout": 10, "read_timeout": 60}
        options.update(config)
        cfg = Config(**options)
        return boto3.session.Session().client(
            "ec2",
            region_name=self.region,
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=cfg,
        )

    @property
    def ec2(self):
        if self._client is None:
            self._client = self.client()
        return self._client

    @property
    def image_id(self) -> str:
        if self._image_id is None:
            images = self.ec2.describe_images(Filters=[{"Name": "name", "Values": ["canopy-sim-linux"]}])["Images"]
            assert images, "the pre-registered image canopy-sim-linux is missing"
            self._image_id = images[0]["ImageId"]
        return self._image_id

    def _write_fast_waiters(self) -> None:
        """`aws ec2 wait` polls every 15 s and has no --delay: give the CLI a copy of botocore's
        own EC2 waiter definitions with a 1 s delay through AWS_DATA_PATH (same acceptors)."""
        src = Path(botocore.__file__).parent / "data" / "ec2" / EC2_API_VERSION / "waiters-2.json"
        model = json.loads(src.read_text())
        for w in model["waiters"].values():
            w["delay"] = WAIT["Delay"]
            w["maxAttempts"] = WAIT["MaxAttempts"]
        dst = self.client_dir / "data" / "ec2" / EC2_API_VERSION
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "waiters-2.json").write_text(json.dumps(model))

    def aws_run(self, *args: str, env: dict[str, str] | None = None, json_output: bool = True,
                timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """Runs the AWS CLI (v1, from this interpreter) with canopyrc's environment."""
        full_env = self.env
        full_env["AWS_DATA_PATH"] = str(self.client_dir / "data")
        if env:
            for k, v in env.items():
                if v is None:
                    full_env.pop(k, None)
                else:
                    full_env[k] = v
        cmd = [sys.executable, "-m", "awscli", *args]
        if json_output:
            cmd += ["--output", "json"]
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def aws(self, *args: str, env: dict[str, str] | None = None):
        """Runs the AWS CLI and returns its parsed JSON output (None for no output); raises
        CliError with stderr on a non-zero exit."""
        proc = self.aws_run(*args, env=env)
        if proc.returncode != 0:
            raise CliError(args, proc)
        out = proc.stdout.strip()
        return json.loads(out) if out else None

    def admin_run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = self.env
        if env:
            for k, v in env.items():
                if v is None:
                    full_env.pop(k, None)
                else:
                    full_env[k] = v
        return subprocess.run([str(self.binary), "admin", *args], env=full_env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    def raw(self, params: dict[str, str] | str, *, sign: bool = True, access_key: str | None = None,
            secret_key: str | None = None, method: str = "POST", headers: dict[str, str] | None = None,
            sign_time: float | None = None) -> RawResponse:
        """One EC2 Query request over plain HTTP, SigV4-signed by botocore unless sign=False."""
        if isinstance(params, dict):
            params = {"Version": EC2_API_VERSION, **params}
            body = percent_encode_sequence(params)  # SigV4's encoding (%20, not +), as botocore sends
        else:
            body = params
        url = self.endpoint.rstrip("/") + "/"
        hdrs = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        if method == "GET":
            url, data = f"{url}?{body}", None
            hdrs = {}
        else:
            data = body.encode()
        hdrs.update(headers or {})
        if sign:
            req = AWSRequest(method=method, url=url, data=data, headers=hdrs)
            creds = Credentials(access_key or self.access_key, secret_key or self.secret_key)
            auth = SigV4Auth(creds, "ec2", self.region)
            if sign_time is not None:
                # Sign as if the clock said sign_time (for request-expiry checks).
                from unittest import mock
                import datetime

                when = datetime.datetime.fromtimestamp(sign_time, datetime.timezone.utc).replace(tzinfo=None)
                with mock.patch("botocore.auth.get_current_datetime", return_value=when):
                    auth.add_auth(req)
            else:
                auth.add_auth(req)
            hdrs = dict(req.headers.items())
        request = urllib.request.Request(url, data=data, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return RawResponse(resp.status, dict(resp.headers.items()), resp.read().decode())
        except urllib.error.HTTPError as e:
            return RawResponse(e.code, dict(e.headers.items()), e.read().decode())

    # ---- conveniences

    def instances(self, **kwargs) -> list[dict]:
        out = []
        for page in self.ec2.get_paginator("describe_instances").paginate(**kwargs):
            for r in page["Reservations"]:
                out.extend(r["Instances"])
        return out

    def wait(self, name: str, **kwargs) -> None:
        self.ec2.get_waiter(name).wait(WaiterConfig=WAIT, **kwargs)


class Launcher:
    """Launches instances for one test, tagged so the test can find exactly its own, and
    terminates them when the test ends."""

    TAG_KEY = "canopy-e2e"

    def __init__(self, cloud: Cloud, name: str):
        self.cloud = cloud
        self.tag = f"{re.sub(r'[^A-Za-z0-9_.-]', '-', name)[:80]}-{uuid.uuid4().hex[:8]}"
        self.ids: list[str] = []

    @property
    def filter(self) -> dict:
        return {"Name": f"tag:{self.TAG_KEY}", "Values": [self.tag]}

    def run(self, count: int = 1, **kwargs) -> dict:
        kwargs.setdefault("ImageId", self.cloud.image_id)
        kwargs.setdefault("InstanceType", "t2.micro")
        kwargs.setdefault("MinCount", count)
        kwargs.setdefault("MaxCount", count)
        specs = list(kwargs.pop("TagSpecifications", []))
        inst = next((s for s in specs if s["ResourceType"] == "instance"), None)
        if inst is None:
            inst = {"ResourceType": "instance", "Tags": []}
            specs.append(inst)
        inst["Tags"] = [*inst["Tags"], {"Key": self.TAG_KEY, "Value": self.tag}]
        resp = self.cloud.ec2.run_instances(TagSpecifications=specs, **kwargs)
        self.ids.extend(i["InstanceId"] for i in resp["Instances"])
        return resp

    def run_ids(self, count: int = 1, **kwargs) -> list[str]:
        return [i["InstanceId"] for i in self.run(count, **kwargs)["Instances"]]

    def mine(self) -> list[dict]:
        return self.cloud.instances(Filters=[self.filter])

    def cleanup(self) -> None:
        live = [i["InstanceId"] for i in self.mine() if i["State"]["Name"] not in ("terminated", "shutting-down")]
        if live and self.cloud.running:
            self.cloud.ec2.terminate_instances(InstanceIds=live)


# --------------------------------------------------------------------------------------
# fixtures and hooks


@pytest.fixture(scope="session")
def canopy_bin() -> Path:
    return find_binary()


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="canopy-e2e-"))
    yield d
    if not _STATE["failed"]:
        shutil.rmtree(d, ignore_errors=True)
    else:
        sys.stderr.write(f"\nkept the canopy e2e data and logs in {d}\n")


@pytest.fixture(scope="session")
def cloud(canopy_bin, workdir, request):
    """The shared cloud: two zones (canopy-1a, canopy-1b), one simulated node each."""
    c = Cloud(canopy_bin, workdir / "cloud", zones=("canopy-1a", "canopy-1b"), nodes_per_zone=1)
    c.start()
    yield c
    code = c.stop()
    if code != 0:
        _STATE["failed"] = True
        pytest.fail(f"canopy dev did not stop cleanly on SIGTERM (exit code {code}); log: {c.log_path}\n"
                    + c.log_tail(100), pytrace=False)


@pytest.fixture
def launcher(cloud, request):
    lx = Launcher(cloud, request.node.name)
    yield lx
    lx.cleanup()


@pytest.fixture
def new_cloud(canopy_bin, workdir, request):
    """Factory for a private cloud with its own data dir (for tests that restart it)."""
    made: list[Cloud] = []

    def make(**kwargs) -> Cloud:
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60] + f"-{len(made)}"
        c = Cloud(canopy_bin, workdir / name, **kwargs)
        c.owner = request.node.nodeid
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _STATE["failed"] = True
        for c in _CLOUDS:
            if c.owner in (None, item.nodeid) and c.log_path.exists():
                report.sections.append((f"canopy log tail ({c.log_path})", c.log_tail(60)))


def pytest_sessionfinish(session, exitstatus):
    if exitstatus not in (0, pytest.ExitCode.OK):
        _STATE["failed"] = True
    for c in _CLOUDS:
        if c.running:
            c.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    failed = _STATE["failed"] or exitstatus not in (0, pytest.ExitCode.OK) \
        or terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if not failed:
        return
    for c in _CLOUDS:
        text = c.log_text()
        if not text:
            continue
        lines = text.splitlines()
        terminalreporter.write_sep("=", f"canopy log: {c.log_path} ({len(lines)} lines, kept)")
        if len(lines) > 3000:
            terminalreporter.write_line(f"... {len(lines) - 3000} earlier lines in the file ...")
            lines = lines[-3000:]
        for line in lines:
            terminalreporter.write_line(line)


@atexit.register
def _kill_leftovers() -> None:
    for c in _CLOUDS:
        if c.running:
            c.kill()
