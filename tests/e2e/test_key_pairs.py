"""Key pairs with boto3 and the AWS CLI: create (RSA and ED25519, PEM and PPK), import,
describe (names, ids, filters, public keys), delete, tags, DryRun, errors, and a launch
with a key. Fingerprints are checked with the tools AWS's documentation tells users to
check them with (openssl, ssh-keygen, puttygen)."""

import base64
import hashlib
import json
import shutil
import subprocess
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import expect_error


def unique(prefix="k"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"



def run(*cmd, stdin: bytes | None = None) -> bytes:
    return subprocess.run(cmd, input=stdin, capture_output=True, check=True).stdout


def colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02x}" for b in digest)


@pytest.fixture
def keys(cloud):
    """Names this test creates, deleted afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        try:
            cloud.ec2.delete_key_pair(KeyName=name)
        except ClientError:
            pass


def test_rsa_key_pair_is_pem_with_aws_fingerprint_and_shown_once(cloud, keys, tmp_path):
    name = unique()
    keys.append(name)
    created = cloud.ec2.create_key_pair(KeyName=name)
    assert created["KeyName"] == name
    assert created["KeyPairId"].startswith("key-")
    pem = created["KeyMaterial"]
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    # AWS: the SHA-1 of the private key's PKCS#8 DER, as
    # `openssl pkcs8 -in key.pem -inform PEM -outform DER -topk8 -nocrypt | openssl sha1 -c`.
    der = run("openssl", "pkcs8", "-inform", "PEM", "-outform", "DER", "-topk8", "-nocrypt",
              stdin=pem.encode())
    assert created["KeyFingerprint"] == colon_hex(hashlib.sha1(der).digest())
    # The public key shown later is the private key's.
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem)
    key_file.chmod(0o600)
    public = run("ssh-keygen", "-y", "-f", str(key_file)).decode().split()
    [info] = cloud.ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)["KeyPairs"]
    assert info["KeyType"] == "rsa"
    assert info["KeyFingerprint"] == created["KeyFingerprint"]
    assert info["KeyPairId"] == created["KeyPairId"]
    assert info["PublicKey"].split()[:2] == public[:2]
    assert info["PublicKey"].split()[2] == name
    assert "CreateTime" in info
    # The private key is never returned again.
    assert "KeyMaterial" not in info
    plain = cloud.ec2.describe_key_pairs(KeyNames=[name])["KeyPairs"][0]
    assert "PublicKey" not in plain


def test_ed25519_key_pair_is_openssh_with_sha256_fingerprint(cloud, keys, tmp_path):
    name = unique()
    keys.append(name)
    created = cloud.ec2.create_key_pair(KeyName=name, KeyType="ed25519")
    assert created["KeyMaterial"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    key_file = tmp_path / "key"
    key_file.write_text(created["KeyMaterial"])
    key_file.chmod(0o600)
    # ssh-keygen prints "256 SHA256:<base64 unpadded> comment (ED25519)"; AWS pads it.
    line = run("ssh-keygen", "-l", "-E", "sha256", "-f", str(key_file)).decode().split()
    fp = line[1].removeprefix("SHA256:")
    assert created["KeyFingerprint"].rstrip("=") == fp
    assert created["KeyFingerprint"].endswith("=")
    [info] = cloud.ec2.describe_key_pairs(KeyNames=[name])["KeyPairs"]
    assert info["KeyType"] == "ed25519"


@pytest.mark.skipif(shutil.which("puttygen") is None, reason="puttygen (putty-tools) not installed")
def test_ppk_format_is_read_by_puttygen(cloud, keys, tmp_path):
    for key_type in ("rsa", "ed25519"):
        name = unique()
        keys.append(name)
        created = cloud.ec2.create_key_pair(KeyName=name, KeyType=key_type, KeyFormat="ppk")
        assert created["KeyMaterial"].startswith("PuTTY-User-Key-File-2:")
        ppk = tmp_path / f"{name}.ppk"
        ppk.write_text(created["KeyMaterial"])
        # puttygen checks the MAC; it prints the OpenSSH public key.
        public = run("puttygen", str(ppk), "-O", "public-openssh").decode().split()
        [info] = cloud.ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)["KeyPairs"]
        assert info["PublicKey"].split()[:2] == public[:2]


def test_import_rsa_and_ed25519_with_aws_fingerprints(cloud, keys, tmp_path):
    rsa_file = tmp_path / "rsa"
    run("ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-C", "me@host", "-f", str(rsa_file))
    rsa_pub = (tmp_path / "rsa.pub").read_bytes()
    name = unique()
    keys.append(name)
    imported = cloud.ec2.import_key_pair(KeyName=name, PublicKeyMaterial=rsa_pub)
    # AWS: MD5 of the public key's DER, as
    # `ssh-keygen -e -f key.pub -m PKCS8 | openssl pkey -pubin -outform DER | openssl md5 -c`.
    pkcs8 = run("ssh-keygen", "-e", "-f", str(tmp_path / "rsa.pub"), "-m", "PKCS8")
    der = run("openssl", "pkey", "-pubin", "-outform", "DER", stdin=pkcs8)
    assert imported["KeyFingerprint"] == colon_hex(hashlib.md5(der).digest())
    assert imported["KeyName"] == name
    assert imported["KeyPairId"].startswith("key-")
    [info] = cloud.ec2.describe_key_pairs(KeyNames=[name], IncludePublicKey=True)["KeyPairs"]
    assert info["PublicKey"].split()[:2] == rsa_pub.decode().split()[:2]
    assert info["KeyType"] == "rsa"

    # The same key as an RFC 4716 block is the same key.
    rfc4716 = run("ssh-keygen", "-e", "-f", str(tmp_path / "rsa.pub"))
    other = unique()
    keys.append(other)
    again = cloud.ec2.import_key_pair(KeyName=other, PublicKeyMaterial=rfc4716)
    assert again["KeyFingerprint"] == imported["KeyFingerprint"]

    ed_file = tmp_path / "ed"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ed_file))
    ed_pub = (tmp_path / "ed.pub").read_bytes()
    ed_name = unique()
    keys.append(ed_name)
    ed = cloud.ec2.import_key_pair(KeyName=ed_name, PublicKeyMaterial=ed_pub)
    fp = run("ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "ed.pub")).decode().split()[1]
    assert ed["KeyFingerprint"].rstrip("=") == fp.removeprefix("SHA256:")


def test_import_refuses_what_is_not_an_rsa_or_ed25519_public_key(cloud, tmp_path):
    refused = unique()
    expect_error(cloud.ec2.import_key_pair, "InvalidKey.Format", KeyName=refused,
           PublicKeyMaterial=b"not a key at all")
    ecdsa = tmp_path / "ec"
    run("ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(ecdsa))
    expect_error(cloud.ec2.import_key_pair, "InvalidKey.Format", KeyName=unique(),
           PublicKeyMaterial=(tmp_path / "ec.pub").read_bytes())
    raw = cloud.raw({"Action": "ImportKeyPair", "Version": "2016-11-15", "KeyName": refused})
    assert raw.status == 400 and raw.error()[0] == "MissingParameter"
    # The refusals stored nothing.
    expect_error(cloud.ec2.describe_key_pairs, "InvalidKeyPair.NotFound", KeyNames=[refused])


def test_duplicate_names_bad_names_and_types_are_refused(cloud, keys):
    name = unique()
    keys.append(name)
    cloud.ec2.create_key_pair(KeyName=name, KeyType="ed25519")
    expect_error(cloud.ec2.create_key_pair, "InvalidKeyPair.Duplicate", KeyName=name)
    expect_error(cloud.ec2.import_key_pair, "InvalidKeyPair.Duplicate", KeyName=name,
           PublicKeyMaterial=b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x")
    expect_error(cloud.ec2.create_key_pair, "InvalidParameterValue", KeyName="x" * 256)
    expect_error(cloud.ec2.create_key_pair, "InvalidParameterValue", KeyName="caf\u00e9")
    raw = cloud.raw({"Action": "CreateKeyPair", "Version": "2016-11-15", "KeyName": unique(),
                     "KeyType": "dsa"})
    assert raw.status == 400 and raw.error()[0] == "InvalidParameterValue"
    raw = cloud.raw({"Action": "CreateKeyPair", "Version": "2016-11-15"})
    assert raw.status == 400 and raw.error()[0] == "MissingParameter"


def test_describe_by_name_id_and_filters_and_unknown_names(cloud, keys):
    a, b = unique("ka"), unique("kb")
    keys.extend([a, b])
    ka = cloud.ec2.create_key_pair(
        KeyName=a, KeyType="ed25519",
        TagSpecifications=[{"ResourceType": "key-pair", "Tags": [{"Key": "team", "Value": "blue"}]}])
    assert ka["Tags"] == [{"Key": "team", "Value": "blue"}]
    kb = cloud.ec2.create_key_pair(KeyName=b, KeyType="ed25519")
    by_id = cloud.ec2.describe_key_pairs(KeyPairIds=[kb["KeyPairId"]])["KeyPairs"]
    assert [k["KeyName"] for k in by_id] == [b]
    both = cloud.ec2.describe_key_pairs(KeyNames=[a, b])["KeyPairs"]
    assert sorted(k["KeyName"] for k in both) == sorted([a, b])

    def names(filters):
        return {k["KeyName"] for k in cloud.ec2.describe_key_pairs(Filters=filters)["KeyPairs"]}

    assert names([{"Name": "key-name", "Values": [a]}]) == {a}
    assert names([{"Name": "key-name", "Values": ["ka-*"]}]) >= {a}
    assert b not in names([{"Name": "key-name", "Values": ["ka-*"]}])
    assert names([{"Name": "fingerprint", "Values": [kb["KeyFingerprint"]]}]) == {b}
    assert names([{"Name": "key-pair-id", "Values": [ka["KeyPairId"]]}]) == {a}
    assert names([{"Name": "tag:team", "Values": ["blue"]}]) == {a}
    assert a in names([{"Name": "tag-key", "Values": ["team"]}])
    assert a in names([{"Name": "tag-value", "Values": ["blue"]}])
    assert names([{"Name": "tag:team", "Values": ["red"]}]) == set()
    expect_error(cloud.ec2.describe_key_pairs, "InvalidParameterValue",
           Filters=[{"Name": "no-such-filter", "Values": ["x"]}])
    err = expect_error(cloud.ec2.describe_key_pairs, "InvalidKeyPair.NotFound", KeyNames=[a, "nope-" + a])
    assert "nope-" + a in err.response["Error"]["Message"]


def test_tags_on_key_pairs_through_create_describe_and_delete_tags(cloud, keys):
    name = unique()
    keys.append(name)
    kp = cloud.ec2.create_key_pair(KeyName=name, KeyType="ed25519")
    kid = kp["KeyPairId"]
    cloud.ec2.create_tags(Resources=[kid], Tags=[{"Key": "Name", "Value": "laptop"}])
    tags = cloud.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [kid]}])["Tags"]
    assert tags == [{"Key": "Name", "Value": "laptop", "ResourceId": kid, "ResourceType": "key-pair"}]
    by_type = cloud.ec2.describe_tags(Filters=[{"Name": "resource-type", "Values": ["key-pair"]}])["Tags"]
    assert any(t["ResourceId"] == kid for t in by_type)
    cloud.ec2.delete_tags(Resources=[kid], Tags=[{"Key": "Name"}])
    [info] = cloud.ec2.describe_key_pairs(KeyPairIds=[kid])["KeyPairs"]
    assert info.get("Tags", []) == []
    expect_error(cloud.ec2.create_tags, "InvalidKeyPair.NotFound", Resources=["key-0123456789abcdef0"],
           Tags=[{"Key": "a", "Value": "b"}])


def test_delete_by_name_or_id_and_dry_run(cloud, keys):
    name = unique()
    kp = cloud.ec2.create_key_pair(KeyName=name, KeyType="ed25519")
    expect_error(cloud.ec2.delete_key_pair, "DryRunOperation", KeyName=name, DryRun=True, status=412)
    expect_error(cloud.ec2.create_key_pair, "DryRunOperation", KeyName=unique(), DryRun=True, status=412)
    expect_error(cloud.ec2.describe_key_pairs, "DryRunOperation", DryRun=True, status=412)
    assert cloud.ec2.describe_key_pairs(KeyNames=[name])["KeyPairs"]
    resp = cloud.ec2.delete_key_pair(KeyPairId=kp["KeyPairId"])
    assert resp["Return"] is True and resp["KeyPairId"] == kp["KeyPairId"]
    expect_error(cloud.ec2.describe_key_pairs, "InvalidKeyPair.NotFound", KeyNames=[name])
    # EC2 answers success for a name that is not there; an id that is not there is an error.
    assert cloud.ec2.delete_key_pair(KeyName=name)["Return"] is True
    expect_error(cloud.ec2.delete_key_pair, "InvalidKeyPair.NotFound", KeyPairId=kp["KeyPairId"])
    # The name can be used again.
    keys.append(name)
    cloud.ec2.create_key_pair(KeyName=name, KeyType="ed25519")


def test_launch_with_a_key_and_unknown_key_is_refused(cloud, keys, launcher):
    name = unique()
    keys.append(name)
    cloud.ec2.create_key_pair(KeyName=name, KeyType="ed25519")
    [iid] = launcher.run_ids(KeyName=name)
    [inst] = cloud.instances(InstanceIds=[iid])
    assert inst["KeyName"] == name
    key_filtered = cloud.instances(Filters=[launcher.filter, {"Name": "key-name", "Values": [name]}])
    assert [i["InstanceId"] for i in key_filtered] == [iid]
    expect_error(launcher.run, "InvalidKeyPair.NotFound", KeyName="no-such-key-" + name)
    # Deleting the key pair leaves the instance's key name as it was.
    cloud.ec2.delete_key_pair(KeyName=name)
    [inst] = cloud.instances(InstanceIds=[iid])
    assert inst["KeyName"] == name


def test_cli_create_describe_delete(cloud, keys):
    name = unique()
    keys.append(name)
    created = cloud.aws("ec2", "create-key-pair", "--key-name", name, "--key-type", "ed25519")
    assert created["KeyMaterial"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    listed = cloud.aws("ec2", "describe-key-pairs", "--key-names", name)
    assert listed["KeyPairs"][0]["KeyFingerprint"] == created["KeyFingerprint"]
    cloud.aws("ec2", "delete-key-pair", "--key-name", name)
    assert name not in json.dumps(cloud.aws("ec2", "describe-key-pairs"))


def test_import_from_file_with_the_cli(cloud, keys, tmp_path):
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id"))
    name = unique()
    keys.append(name)
    # The CLI reads fileb:// and base64-encodes the blob itself.
    imported = cloud.aws("ec2", "import-key-pair", "--key-name", name,
                         "--public-key-material", f"fileb://{tmp_path / 'id.pub'}")
    fp = run("ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "id.pub")).decode().split()[1]
    assert imported["KeyFingerprint"].rstrip("=") == fp.removeprefix("SHA256:")
    assert base64.b64decode(imported["KeyFingerprint"])
