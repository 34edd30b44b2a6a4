"""Authentication and error responses: codes, HTTP statuses and the EC2 error XML."""

import time
import uuid

import boto3
from botocore.config import Config

import pytest
from botocore.exceptions import ClientError

from conftest import error_code, expect_error, http_status

UNKNOWN_ID = "i-0123456789abcdef0"


# ---- authentication


def test_wrong_secret_is_signature_does_not_match(cloud):
    bad = cloud.client(secret_key=cloud.secret_key[:-4] + "XXXX")
    expect_error(bad.describe_instances, "SignatureDoesNotMatch", status=403)


def test_unknown_access_key_is_auth_failure(cloud):
    bad = cloud.client(access_key="AKIA" + uuid.uuid4().hex[:16].upper())
    err = expect_error(bad.describe_regions, "AuthFailure", status=None)
    assert http_status(err) in (401, 403)


def test_session_token_canopy_never_issued_is_refused(cloud):
    # Correctly signed with the real secret, but carrying a temporary-credential token that
    # Canopy cannot have issued (it issues none): AWS refuses unknown tokens.
    bad = boto3.session.Session().client(
        "ec2", region_name=cloud.region, endpoint_url=cloud.endpoint,
        aws_access_key_id=cloud.access_key, aws_secret_access_key=cloud.secret_key,
        aws_session_token="FQoGZXIvYXdzEBogus", config=Config(retries={"max_attempts": 1}),
    )
    err = expect_error(bad.describe_regions, "AuthFailure", status=None)
    assert http_status(err) in (401, 403)


def test_unsigned_request_is_rejected_with_ec2_error_xml(cloud):
    resp = cloud.raw({"Action": "DescribeInstances"}, sign=False)
    assert not 200 <= resp.status < 300, resp
    assert resp.status in (400, 401, 403), resp
    code, message = resp.error()
    assert code in ("MissingAuthenticationToken", "AuthFailure"), resp
    assert message
    assert "<RequestID>" in resp.body, "EC2 errors carry <RequestID>"
    assert "reservationSet" not in resp.body


def test_signed_raw_request_succeeds_by_post_and_get(cloud):
    """Sanity for the raw helpers the other tests rely on, and GET being legal EC2."""
    for method in ("POST", "GET"):
        resp = cloud.raw({"Action": "DescribeRegions"}, method=method)
        assert resp.status == 200, resp
        root = resp.xml()
        assert root.tag.endswith("DescribeRegionsResponse"), root.tag
        assert "<requestId>" in resp.body
        assert "canopy-1" in resp.body


def test_signed_get_with_special_characters(cloud, launcher):
    """GET puts the parameters in the signed query string: the server must canonicalise
    percent-encoded UTF-8, reserved characters and spaces exactly as SigV4 says."""
    value = "a b+c/ü~*!'()&=?%"
    (iid,) = launcher.run_ids(1, TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "odd", "Value": value}]}])
    for method in ("GET", "POST"):
        resp = cloud.raw({"Action": "DescribeInstances", "Filter.1.Name": "tag:odd", "Filter.1.Value.1": value}, method=method)
        assert resp.status == 200, (method, resp)
        assert iid in resp.body, (method, resp)


def test_stale_or_future_signature_is_rejected(cloud):
    # AWS only accepts a signature made within a few minutes of its own clock (replay window).
    for offset in (-3600, 3600):
        resp = cloud.raw({"Action": "DescribeRegions"}, sign_time=time.time() + offset)
        assert resp.status == 400, (offset, resp)
        assert resp.error()[0] == "RequestExpired", (offset, resp)
    # A little clock skew is fine.
    assert cloud.raw({"Action": "DescribeRegions"}, sign_time=time.time() - 60).status == 200


def test_credential_scope_for_another_region_is_rejected(cloud):
    import boto3

    wrong = boto3.session.Session().client(
        "ec2", region_name="us-east-1", endpoint_url=cloud.endpoint,
        aws_access_key_id=cloud.access_key, aws_secret_access_key=cloud.secret_key)
    with pytest.raises(ClientError) as exc:
        wrong.describe_regions()
    assert error_code(exc.value) in ("SignatureDoesNotMatch", "AuthFailure"), exc.value.response["Error"]
    assert http_status(exc.value) in (401, 403)


def test_tampered_body_is_rejected(cloud):
    """A signature covers the body: a request altered after signing must fail."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    import urllib.error
    import urllib.request

    url = cloud.endpoint.rstrip("/") + "/"
    body = "Action=DescribeInstances&Version=2016-11-15"
    req = AWSRequest(method="POST", url=url, data=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Auth(Credentials(cloud.access_key, cloud.secret_key), "ec2", cloud.region).add_auth(req)
    tampered = body + "&InstanceId.1=" + UNKNOWN_ID
    r = urllib.request.Request(url, data=tampered.encode(), headers=dict(req.headers.items()), method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(r, timeout=30)
    assert exc.value.code == 403
    assert b"SignatureDoesNotMatch" in exc.value.read()


# ---- request errors


def test_unknown_instance_id_not_found(cloud):
    err = expect_error(cloud.ec2.describe_instances, "InvalidInstanceID.NotFound", InstanceIds=[UNKNOWN_ID])
    assert UNKNOWN_ID in err.response["Error"]["Message"]
    expect_error(cloud.ec2.terminate_instances, "InvalidInstanceID.NotFound", InstanceIds=[UNKNOWN_ID])
    expect_error(cloud.ec2.stop_instances, "InvalidInstanceID.NotFound", InstanceIds=[UNKNOWN_ID])
    expect_error(cloud.ec2.start_instances, "InvalidInstanceID.NotFound", InstanceIds=[UNKNOWN_ID])


def test_unknown_id_among_known_ones_fails_the_whole_call(cloud, launcher):
    (iid,) = launcher.run_ids(1)
    expect_error(cloud.ec2.terminate_instances, "InvalidInstanceID.NotFound", InstanceIds=[iid, UNKNOWN_ID])
    state = cloud.instances(InstanceIds=[iid])[0]["State"]["Name"]
    assert state in ("pending", "running"), "a failed TerminateInstances must not terminate anything"


def test_malformed_instance_id(cloud):
    expect_error(cloud.ec2.describe_instances, "InvalidInstanceID.Malformed", InstanceIds=["i-xyz"])
    expect_error(cloud.ec2.terminate_instances, "InvalidInstanceID.Malformed", InstanceIds=["not-an-id"])


def test_unknown_ami(cloud, launcher):
    expect_error(launcher.run, "InvalidAMIID.NotFound", ImageId="ami-0123456789abcdef0")
    expect_error(launcher.run, "InvalidAMIID.Malformed", ImageId="ami-zzz")
    assert launcher.mine() == []


def test_min_count_above_max_count(cloud, launcher):
    expect_error(launcher.run, "InvalidParameterValue", MinCount=3, MaxCount=2)
    expect_error(launcher.run, "InvalidParameterValue", MinCount=0, MaxCount=1)
    assert launcher.mine() == []


def test_unknown_instance_type_on_launch(cloud, launcher):
    expect_error(launcher.run, "InvalidParameterValue", InstanceType="t9.huge")
    assert launcher.mine() == []


def test_missing_image_id(cloud):
    resp = cloud.raw({"Action": "RunInstances", "MinCount": "1", "MaxCount": "1", "InstanceType": "t2.micro"})
    assert resp.status == 400, resp
    assert resp.error()[0] == "MissingParameter", resp


def test_unknown_action(cloud):
    resp = cloud.raw({"Action": "LaunchRockets"})
    assert resp.status == 400, resp
    assert resp.error()[0] == "InvalidAction", resp
    # An action name is needed at all.
    resp = cloud.raw({"Foo": "bar"})
    assert resp.status == 400, resp
    assert resp.error()[0] in ("MissingAction", "InvalidAction", "MissingParameter"), resp


def test_dry_run(cloud, launcher):
    err = expect_error(launcher.run, "DryRunOperation", status=412, DryRun=True)
    assert "DryRun" in err.response["Error"]["Message"]
    assert launcher.mine() == [], "a DryRun launch must not create anything"

    (iid,) = launcher.run_ids(1)
    cloud.wait("instance_running", InstanceIds=[iid])
    expect_error(cloud.ec2.stop_instances, "DryRunOperation", status=412, InstanceIds=[iid], DryRun=True)
    expect_error(cloud.ec2.terminate_instances, "DryRunOperation", status=412, InstanceIds=[iid], DryRun=True)
    assert cloud.instances(InstanceIds=[iid])[0]["State"]["Name"] == "running"
    # DryRun still checks the request: an unknown id is reported as such.
    expect_error(cloud.ec2.stop_instances, "InvalidInstanceID.NotFound", InstanceIds=[UNKNOWN_ID], DryRun=True)


def test_bad_user_data_base64(cloud, launcher):
    resp = cloud.raw({
        "Action": "RunInstances", "ImageId": cloud.image_id, "MinCount": "1", "MaxCount": "1",
        "InstanceType": "t2.micro", "UserData": "!!!not base64!!!",
        "TagSpecification.1.ResourceType": "instance",
        "TagSpecification.1.Tag.1.Key": launcher.TAG_KEY, "TagSpecification.1.Tag.1.Value": launcher.tag,
    })
    assert resp.status == 400, resp
    assert resp.error()[0] == "InvalidParameterValue", resp
    assert launcher.mine() == []


def test_user_data_size_limit(cloud, launcher):
    # EC2 limits user data to 16 KB before base64.
    expect_error(launcher.run, "InvalidParameterValue", UserData="x" * (16 * 1024 + 1))
    assert launcher.mine() == []


def test_user_data_is_accepted(cloud, launcher):
    # boto3 base64-encodes UserData itself; the simulated guest's console reports its size.
    user_data = "#!/bin/sh\necho hello from canopy\n"
    (iid,) = launcher.run_ids(1, UserData=user_data)
    cloud.wait("instance_running", InstanceIds=[iid])
    out = cloud.ec2.get_console_output(InstanceId=iid)["Output"]
    assert f"user-data {len(user_data.encode())} bytes" in out, out


def test_user_data_round_trip(cloud, launcher):
    (iid,) = launcher.run_ids(1, UserData="hello")
    attr = cloud.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
    assert attr["InstanceId"] == iid
    assert attr["UserData"]["Value"] == "aGVsbG8="
    # The other attributes a user reads, with EC2's shapes.
    get = lambda name: cloud.ec2.describe_instance_attribute(InstanceId=iid, Attribute=name)  # noqa: E731
    assert get("instanceType")["InstanceType"]["Value"] == "t2.micro"
    assert get("disableApiTermination")["DisableApiTermination"]["Value"] is False
    assert get("instanceInitiatedShutdownBehavior")["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    assert get("kernel")["KernelId"] == {}, "the simulated image boots without a kernel of its own"
    [default] = cloud.ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    assert get("groupSet")["Groups"] == [{"GroupId": default["GroupId"]}]
    assert get("blockDeviceMapping")["BlockDeviceMappings"] == []
    (other,) = launcher.run_ids(1)
    assert cloud.ec2.describe_instance_attribute(InstanceId=other, Attribute="userData")["UserData"] == {}
    expect_error(cloud.ec2.describe_instance_attribute, "InvalidParameterValue", InstanceId=iid,
                 Attribute="noSuchAttribute")
    expect_error(cloud.ec2.describe_instance_attribute, "InvalidInstanceID.NotFound",
                 InstanceId="i-0123456789abcdef0", Attribute="userData")


def test_unknown_zone_in_placement(cloud, launcher):
    expect_error(launcher.run, "InvalidParameterValue", Placement={"AvailabilityZone": "canopy-1z"})
    assert launcher.mine() == []


def test_launch_beyond_capacity(cloud, launcher):
    types = cloud.ec2.describe_instance_types()["InstanceTypes"]
    biggest = max(types, key=lambda t: (t["VCpuInfo"]["DefaultVCpus"], t["MemoryInfo"]["SizeInMiB"]))
    before = {i["InstanceId"] for i in cloud.instances()}
    # EC2 answers this with a 5xx that SDKs retry; one attempt is enough here.
    once = cloud.client(retries={"mode": "standard", "max_attempts": 1})
    with pytest.raises(ClientError) as exc:
        once.run_instances(ImageId=cloud.image_id, InstanceType=biggest["InstanceType"], MinCount=1000, MaxCount=1000,
                           TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": launcher.TAG_KEY, "Value": launcher.tag}]}])
    assert error_code(exc.value) == "InsufficientInstanceCapacity", exc.value.response["Error"]
    assert http_status(exc.value) >= 400
    assert launcher.mine() == [], "a launch that cannot be placed must create nothing"
    after = {i["InstanceId"] for i in cloud.instances()}
    assert after == before


def test_tag_limit_per_resource(cloud, launcher):
    (iid,) = launcher.run_ids(1)  # carries 1 tag already (the launcher's)
    cloud.ec2.create_tags(Resources=[iid], Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(49)])
    assert len(cloud.instances(InstanceIds=[iid])[0]["Tags"]) == 50
    expect_error(cloud.ec2.create_tags, "TagLimitExceeded", Resources=[iid], Tags=[{"Key": "one-too-many", "Value": "v"}])
    assert len(cloud.instances(InstanceIds=[iid])[0]["Tags"]) == 50
