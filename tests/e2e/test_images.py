"""Images with content on the simulated cloud: RegisterImage from a file the cloud
controller reads, `canopy admin upload-image` from the operator's machine, what DescribeImages
and `canopy admin images` show, launches from them, and deregistration. (Real guests booting
these images: test_libvirt.py.)"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import error_code


def fake_kernel(path):
    """Bytes with the x86 Linux boot header's signature, as a bzImage has at 0x202."""
    data = bytearray(4096)
    data[0x202:0x206] = b"HdrS"
    data[0x300:0x310] = uuid.uuid4().bytes  # distinct content per test run
    path.write_bytes(bytes(data))
    return bytes(data)


def fake_qcow2(path):
    data = b"QFI\xfb" + uuid.uuid4().bytes * 64
    path.write_bytes(data)
    return data


def test_register_upload_describe_launch_and_deregister(cloud, tmp_path):
    tag = uuid.uuid4().hex[:8]
    kernel_bytes = fake_kernel(tmp_path / "vmlinuz")
    disk_bytes = fake_qcow2(tmp_path / "disk.qcow2")

    # The operator uploads the kernel from where the CLI runs.
    proc = cloud.admin_run("--json", "upload-image", str(tmp_path / "vmlinuz"), "--name", f"k-{tag}")
    assert proc.returncode == 0, proc.stderr
    kernel = json.loads(proc.stdout)
    assert kernel["kind"] == "kernel" and kernel["image_id"].startswith("eki-")
    assert kernel["size_bytes"] == len(kernel_bytes)
    assert kernel["sha256"] == hashlib.sha256(kernel_bytes).hexdigest()

    # A machine image naming it, through EC2 RegisterImage (a file the CLC reads).
    emi = cloud.ec2.register_image(Name=f"disk-{tag}", ImageLocation=str(tmp_path / "disk.qcow2"),
                                   KernelId=kernel["image_id"], Description="uploaded")["ImageId"]
    (img,) = cloud.ec2.describe_images(ImageIds=[emi])["Images"]
    assert (img["ImageType"], img["KernelId"], img["State"]) == ("machine", kernel["image_id"], "available")
    kinds = {i["ImageId"]: i["ImageType"] for i in cloud.ec2.describe_images(
        Filters=[{"Name": "image-type", "Values": ["kernel"]}])["Images"]}
    assert kinds.get(kernel["image_id"]) == "kernel" and emi not in kinds

    listed = json.loads(cloud.admin_run("--json", "images").stdout)
    (row,) = [i for i in listed if i["image_id"] == emi]
    assert (row["size_bytes"], row["disk_format"]) == (len(disk_bytes), "qcow2")
    assert row["sha256"] == hashlib.sha256(disk_bytes).hexdigest()
    table = cloud.admin_run("images")
    assert table.returncode == 0 and emi in table.stdout

    # Instances launch from it and carry its kernel.
    iid = cloud.ec2.run_instances(ImageId=emi, InstanceType="t2.micro", MinCount=1,
                                  MaxCount=1)["Instances"][0]["InstanceId"]
    cloud.wait("instance_running", InstanceIds=[iid])
    inst = cloud.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["KernelId"] == kernel["image_id"]

    # Bad uploads: a duplicate name, a ramdisk id that is a kernel, no token.
    dup = cloud.admin_run("upload-image", str(tmp_path / "vmlinuz"), "--name", f"k-{tag}")
    assert dup.returncode != 0 and "already in use" in dup.stderr
    wrong = cloud.admin_run("upload-image", str(tmp_path / "disk.qcow2"), "--name", f"w-{tag}",
                            "--kernel-id", kernel["image_id"], "--ramdisk-id", kernel["image_id"])
    assert wrong.returncode != 0 and "not a ramdisk image" in wrong.stderr
    req = urllib.request.Request(f"{cloud.admin_endpoint}/v1/images?name=anon-{tag}", data=kernel_bytes,
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401

    # Deregistered: gone from DescribeImages, no new launches, the running instance stays.
    cloud.ec2.deregister_image(ImageId=emi)
    assert not cloud.ec2.describe_images(Filters=[{"Name": "name", "Values": [f"disk-{tag}"]}])["Images"]
    with pytest.raises(ClientError) as e:
        cloud.ec2.run_instances(ImageId=emi, MinCount=1, MaxCount=1)
    assert error_code(e.value) == "InvalidAMIID.Unavailable"
    with pytest.raises(ClientError) as e:
        cloud.ec2.deregister_image(ImageId=emi)
    assert error_code(e.value) == "InvalidAMIID.NotFound"
    inst = cloud.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["State"]["Name"] == "running"
    cloud.ec2.terminate_instances(InstanceIds=[iid])


@pytest.fixture
def https_server(tmp_path):
    """Serves tmp_path/www over HTTPS on loopback with a certificate for 127.0.0.1 from a
    throwaway CA; yields (base URL, the CA's certificate file, the served directory)."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    # A CA, and the server's certificate signed by it (webpki refuses a CA as end entity).
    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    cert, key, csr, ext = (tmp_path / n for n in ("cert.pem", "key.pem", "leaf.csr", "leaf.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
         "-subj", "/CN=canopy-e2e-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(www), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca, www
    server.shutdown()


def test_images_register_from_https_urls_with_the_servers_certificate_checked(new_cloud, https_server, cloud):
    base, cert, www = https_server
    tag = uuid.uuid4().hex[:8]
    kernel_bytes = fake_kernel(www / "vmlinuz")

    # A cloud controller that trusts the server's certificate (SSL_CERT_FILE) takes it.
    trusting = new_cloud(zones=("canopy-1a",), extra_env={"SSL_CERT_FILE": str(cert)}).start()
    eki = trusting.ec2.register_image(Name=f"https-{tag}", ImageLocation=f"{base}/vmlinuz")["ImageId"]
    (img,) = trusting.ec2.describe_images(ImageIds=[eki])["Images"]
    assert (img["ImageType"], img["ImageLocation"]) == ("kernel", f"{base}/vmlinuz")
    listed = json.loads(trusting.admin_run("--json", "images").stdout)
    (row,) = [i for i in listed if i["image_id"] == eki]
    assert row["sha256"] == hashlib.sha256(kernel_bytes).hexdigest()
    # A missing file is the server's 404, in EC2's terms.
    with pytest.raises(ClientError) as e:
        trusting.ec2.register_image(Name=f"gone-{tag}", ImageLocation=f"{base}/no-such-image")
    assert error_code(e.value) == "InvalidParameterValue" and "404" in str(e.value)

    # One that does not trust it refuses, and says why.
    with pytest.raises(ClientError) as e:
        cloud.ec2.register_image(Name=f"untrusted-{tag}", ImageLocation=f"{base}/vmlinuz")
    assert error_code(e.value) == "InvalidParameterValue"
    assert "certificate" in str(e.value).lower(), str(e.value)


def test_describe_images_pages_with_max_results_and_next_token(cloud, tmp_path):
    """DescribeImages pages as EC2 does (MaxResults 5-1000, not with ImageId.N): boto3's
    paginator and the CLI's --page-size see every image exactly once, in creation order."""
    from conftest import expect_error

    tag = uuid.uuid4().hex[:8]
    fake_qcow2(tmp_path / "disk.qcow2")
    made = [cloud.ec2.register_image(Name=f"page-{tag}-{n}", ImageLocation=str(tmp_path / "disk.qcow2"))["ImageId"]
            for n in range(7)]
    mine = [{"Name": "name", "Values": [f"page-{tag}-*"]}]
    try:
        pages = list(cloud.ec2.get_paginator("describe_images").paginate(
            Owners=["self"], Filters=mine, PaginationConfig={"PageSize": 5}))
        assert [len(p["Images"]) for p in pages] == [5, 2]
        assert "NextToken" in pages[0] and "NextToken" not in pages[1]
        assert [i["ImageId"] for p in pages for i in p["Images"]] == made

        whole = cloud.ec2.describe_images(Owners=["self"], Filters=mine)
        assert [i["ImageId"] for i in whole["Images"]] == made and "NextToken" not in whole

        expect_error(cloud.ec2.describe_images, "InvalidParameterCombination", ImageIds=[made[0]], MaxResults=5)
        expect_error(cloud.ec2.describe_images, "InvalidParameterValue", MaxResults=4)
        expect_error(cloud.ec2.describe_images, "InvalidParameterValue", MaxResults=1001)
        expect_error(cloud.ec2.describe_images, "InvalidParameterValue", MaxResults=5, NextToken="not-a-token")

        cli = cloud.aws("ec2", "describe-images", "--owners", "self", "--page-size", "5",
                        "--filters", f"Name=name,Values=page-{tag}-*")["Images"]
        assert [i["ImageId"] for i in cli] == made
    finally:
        for image in made:
            cloud.ec2.deregister_image(ImageId=image)
