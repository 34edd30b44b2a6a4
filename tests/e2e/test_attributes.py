"""ModifyInstanceAttribute / DescribeInstanceAttribute (termination and stop protection,
user data while stopped) and DescribeAccountAttributes, with boto3 and the AWS CLI."""

import base64

from conftest import expect_error


def attr(cloud, iid, name):
    return cloud.ec2.describe_instance_attribute(InstanceId=iid, Attribute=name)


def test_termination_protection_refuses_terminate_until_lifted(cloud, launcher):
    [iid] = launcher.run_ids()
    assert attr(cloud, iid, "disableApiTermination")["DisableApiTermination"] == {"Value": False}
    cloud.ec2.modify_instance_attribute(InstanceId=iid, DisableApiTermination={"Value": True})
    assert attr(cloud, iid, "disableApiTermination")["DisableApiTermination"] == {"Value": True}
    err = expect_error(cloud.ec2.terminate_instances, "OperationNotPermitted", InstanceIds=[iid])
    assert iid in err.response["Error"]["Message"]
    # All or nothing: a protected instance among others refuses the whole call.
    [other] = launcher.run_ids()
    expect_error(cloud.ec2.terminate_instances, "OperationNotPermitted", InstanceIds=[other, iid])
    states = {i["InstanceId"]: i["State"]["Name"] for i in cloud.instances(InstanceIds=[iid, other])}
    assert "shutting-down" not in states.values() and "terminated" not in states.values()
    # The older Attribute/Value form, as the CLI's --attribute/--value send it.
    cloud.aws("ec2", "modify-instance-attribute", "--instance-id", iid,
              "--attribute", "disableApiTermination", "--value", "false")
    assert attr(cloud, iid, "disableApiTermination")["DisableApiTermination"] == {"Value": False}
    cloud.ec2.terminate_instances(InstanceIds=[iid, other])


def test_stop_protection_refuses_stop(cloud, launcher):
    [iid] = launcher.run_ids()
    cloud.wait("instance_running", InstanceIds=[iid])
    cloud.aws("ec2", "modify-instance-attribute", "--instance-id", iid, "--disable-api-stop")
    assert attr(cloud, iid, "disableApiStop")["DisableApiStop"] == {"Value": True}
    expect_error(cloud.ec2.stop_instances, "OperationNotPermitted", InstanceIds=[iid])
    # Termination is not stop: it goes through.
    cloud.ec2.terminate_instances(InstanceIds=[iid])


def test_user_data_changes_only_while_stopped(cloud, launcher):
    [iid] = launcher.run_ids(UserData="first")
    cloud.wait("instance_running", InstanceIds=[iid])
    expect_error(cloud.ec2.modify_instance_attribute, "IncorrectInstanceState", InstanceId=iid,
           UserData={"Value": b"second"})
    cloud.ec2.stop_instances(InstanceIds=[iid])
    cloud.wait("instance_stopped", InstanceIds=[iid])
    # botocore base64-encodes the blob.
    cloud.ec2.modify_instance_attribute(InstanceId=iid, UserData={"Value": b"second"})
    got = attr(cloud, iid, "userData")["UserData"]["Value"]
    assert base64.b64decode(got) == b"second"
    cloud.ec2.start_instances(InstanceIds=[iid])
    cloud.wait("instance_running", InstanceIds=[iid])
    assert base64.b64decode(attr(cloud, iid, "userData")["UserData"]["Value"]) == b"second"


def instance(cloud, iid):
    [inst] = cloud.instances(InstanceIds=[iid])
    return inst


def test_instance_type_changes_only_while_stopped_and_the_start_uses_it(cloud, launcher):
    [iid] = launcher.run_ids(InstanceType="t2.micro")
    cloud.wait("instance_running", InstanceIds=[iid])
    err = expect_error(cloud.ec2.modify_instance_attribute, "IncorrectInstanceState", InstanceId=iid,
                       InstanceType={"Value": "t2.medium"})
    assert err.response["Error"]["Message"] == f"The instance '{iid}' is not in the 'stopped' state."
    assert attr(cloud, iid, "instanceType")["InstanceType"] == {"Value": "t2.micro"}

    cloud.ec2.stop_instances(InstanceIds=[iid])
    cloud.wait("instance_stopped", InstanceIds=[iid])
    expect_error(cloud.ec2.modify_instance_attribute, "InvalidParameterValue", InstanceId=iid,
                 InstanceType={"Value": "t9.enormous"})
    expect_error(cloud.ec2.modify_instance_attribute, "DryRunOperation", status=412, InstanceId=iid,
                 InstanceType={"Value": "t2.medium"}, DryRun=True)
    assert attr(cloud, iid, "instanceType")["InstanceType"] == {"Value": "t2.micro"}
    cloud.ec2.modify_instance_attribute(InstanceId=iid, InstanceType={"Value": "t2.medium"})
    assert attr(cloud, iid, "instanceType")["InstanceType"] == {"Value": "t2.medium"}
    # The older Attribute/Value form.
    raw = cloud.raw({"Action": "ModifyInstanceAttribute", "InstanceId": iid,
                     "Attribute": "instanceType", "Value": "m1.small"})
    assert raw.status == 200
    assert attr(cloud, iid, "instanceType")["InstanceType"] == {"Value": "m1.small"}
    # The CLI, with the JSON structure its documentation shows.
    cloud.aws("ec2", "modify-instance-attribute", "--instance-id", iid,
              "--instance-type", '{"Value": "t2.large"}')
    assert attr(cloud, iid, "instanceType")["InstanceType"] == {"Value": "t2.large"}
    inst = instance(cloud, iid)
    assert (inst["InstanceType"], inst["State"]["Name"]) == ("t2.large", "stopped")

    cloud.ec2.start_instances(InstanceIds=[iid])
    cloud.wait("instance_running", InstanceIds=[iid])
    inst = instance(cloud, iid)
    assert (inst["InstanceType"], inst["State"]["Name"]) == ("t2.large", "running")
    assert cloud.ec2.describe_instances(
        Filters=[{"Name": "instance-type", "Values": ["t2.large"]},
                 {"Name": "instance-id", "Values": [iid]}])["Reservations"]
    cloud.ec2.terminate_instances(InstanceIds=[iid])


def test_modify_refuses_bad_input(cloud, launcher):
    [iid] = launcher.run_ids()
    expect_error(cloud.ec2.modify_instance_attribute, "InvalidInstanceID.NotFound",
           InstanceId="i-0123456789abcdef0", DisableApiTermination={"Value": True})
    expect_error(cloud.ec2.modify_instance_attribute, "DryRunOperation", status=412, InstanceId=iid,
           DisableApiTermination={"Value": True}, DryRun=True)
    assert attr(cloud, iid, "disableApiTermination")["DisableApiTermination"] == {"Value": False}
    raw = cloud.raw({"Action": "ModifyInstanceAttribute", "InstanceId": iid})
    assert raw.status == 400 and raw.error()[0] == "MissingParameter"
    raw = cloud.raw({"Action": "ModifyInstanceAttribute", "InstanceId": iid,
                     "Attribute": "disableApiTermination", "Value": "maybe"})
    assert raw.status == 400 and raw.error()[0] == "InvalidParameterValue"
    raw = cloud.raw({"Action": "ModifyInstanceAttribute", "InstanceId": iid,
                     "Attribute": "noSuchThing", "Value": "x"})
    assert raw.status == 400 and raw.error()[0] == "InvalidParameterValue"
    raw = cloud.raw({"Action": "ModifyInstanceAttribute", "InstanceId": iid,
                     "DisableApiTermination.Value": "true", "DisableApiStop.Value": "true"})
    assert raw.status == 400 and raw.error()[0] == "InvalidParameterCombination"


def test_account_attributes(cloud):
    attrs = cloud.ec2.describe_account_attributes()["AccountAttributes"]
    by_name = {a["AttributeName"]: [v["AttributeValue"] for v in a["AttributeValues"]] for a in attrs}
    assert by_name["supported-platforms"] == ["VPC"]
    assert by_name["default-vpc"] == ["none"]
    assert int(by_name["max-instances"][0]) > 0
    # canopy dev's default Elastic IP pool, 198.51.100.0/24, less the reserved addresses.
    assert by_name["max-elastic-ips"] == by_name["vpc-max-elastic-ips"] == ["251"]
    one = cloud.ec2.describe_account_attributes(AttributeNames=["default-vpc"])["AccountAttributes"]
    assert [a["AttributeName"] for a in one] == ["default-vpc"]
    expect_error(cloud.ec2.describe_account_attributes, "InvalidParameterValue", AttributeNames=["nope"])
    cli = cloud.aws("ec2", "describe-account-attributes", "--attribute-names", "supported-platforms")
    assert cli["AccountAttributes"][0]["AttributeValues"] == [{"AttributeValue": "VPC"}]
