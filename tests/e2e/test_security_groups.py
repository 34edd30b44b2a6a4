"""Security groups with boto3 and the AWS CLI: the default group, create/describe/delete,
ingress and egress rules (protocols, ports, IPv4/IPv6 CIDRs, referenced groups),
DescribeSecurityGroupRules, launches with groups, and EC2's errors."""

import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import expect_error



@pytest.fixture
def groups(cloud):
    made: list[str] = []

    def create(**kwargs):
        kwargs.setdefault("GroupName", f"test-{uuid.uuid4().hex[:8]}")
        kwargs.setdefault("Description", "test group")
        gid = cloud.ec2.create_security_group(**kwargs)["GroupId"]
        made.append(gid)
        return gid

    yield create
    for gid in reversed(made):
        try:
            cloud.ec2.delete_security_group(GroupId=gid)
        except ClientError:
            pass


def group(cloud, gid):
    return cloud.ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]


def test_default_group_exists_with_ec2_default_rules_and_cannot_be_deleted(cloud):
    [default] = cloud.ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    assert default["GroupId"].startswith("sg-")
    assert default["OwnerId"].isdigit()
    [ingress] = default["IpPermissions"]
    assert ingress["IpProtocol"] == "-1"
    assert [g["GroupId"] for g in ingress["UserIdGroupPairs"]] == [default["GroupId"]]
    [egress] = default["IpPermissionsEgress"]
    assert egress["IpProtocol"] == "-1" and egress["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    expect_error(cloud.ec2.delete_security_group, "CannotDelete", GroupId=default["GroupId"])


def test_create_describe_authorize_revoke_and_delete(cloud, groups):
    web = groups(Description="web servers",
                 TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": "tier", "Value": "web"}]}])
    peer = groups()
    g = group(cloud, web)
    assert g["Description"] == "web servers"
    assert g["Tags"] == [{"Key": "tier", "Value": "web"}]
    assert g["IpPermissions"] == []
    assert g["IpPermissionsEgress"][0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]
    resp = cloud.ec2.authorize_security_group_ingress(GroupId=web, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
         "IpRanges": [{"CidrIp": "10.0.0.0/8", "Description": "office"}, {"CidrIp": "192.168.1.0/24"}],
         "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/32"}]},
        {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": peer}]},
    ])
    assert resp["Return"] is True
    rules = resp["SecurityGroupRules"]
    assert len(rules) == 5 and all(r["SecurityGroupRuleId"].startswith("sgr-") for r in rules)
    assert {r["IsEgress"] for r in rules} == {False}
    perms = {p["IpProtocol"]: p for p in group(cloud, web)["IpPermissions"]}
    assert perms["tcp"]["FromPort"] == 443 and perms["tcp"]["ToPort"] == 443
    assert perms["tcp"]["IpRanges"] == [{"CidrIp": "10.0.0.0/8", "Description": "office"},
                                        {"CidrIp": "192.168.1.0/24"}]
    assert perms["tcp"]["Ipv6Ranges"] == [{"CidrIpv6": "2001:db8::/32"}]
    assert perms["icmp"]["FromPort"] == 8 and perms["icmp"]["ToPort"] == -1
    assert [p["GroupId"] for p in perms["-1"]["UserIdGroupPairs"]] == [peer]
    # The same rule twice is refused, and nothing of that call is added.
    expect_error(cloud.ec2.authorize_security_group_ingress, "InvalidPermission.Duplicate", GroupId=web,
           IpPermissions=[{"IpProtocol": "udp", "FromPort": 53, "ToPort": 53, "IpRanges": [{"CidrIp": "1.1.1.1/32"}]},
                          {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    assert "udp" not in {p["IpProtocol"] for p in group(cloud, web)["IpPermissions"]}
    # Filters on rules.
    by_port = cloud.ec2.describe_security_groups(Filters=[
        {"Name": "ip-permission.from-port", "Values": ["443"]}, {"Name": "group-id", "Values": [web, peer]}])
    assert [x["GroupId"] for x in by_port["SecurityGroups"]] == [web]
    by_tag = cloud.ec2.describe_security_groups(Filters=[{"Name": "tag:tier", "Values": ["web"]}])
    assert [x["GroupId"] for x in by_tag["SecurityGroups"]] == [web]
    # DescribeSecurityGroupRules, filtered by group.
    listed = cloud.ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [web]}])
    assert len(listed["SecurityGroupRules"]) == 6  # five ingress, the default egress
    # Revoke: one CIDR of the tcp permission; a rule that is not there is reported back.
    out = cloud.ec2.revoke_security_group_ingress(GroupId=web, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "192.168.1.0/24"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "192.168.1.0/24"}]},
    ])
    assert out["Return"] is True
    assert [p["FromPort"] for p in out["UnknownIpPermissions"]] == [22]
    perms = {p["IpProtocol"]: p for p in group(cloud, web)["IpPermissions"]}
    assert perms["tcp"]["IpRanges"] == [{"CidrIp": "10.0.0.0/8", "Description": "office"}]
    # Revoke by rule id.
    icmp_rule = next(r for r in rules if r["IpProtocol"] == "icmp")["SecurityGroupRuleId"]
    cloud.ec2.revoke_security_group_ingress(GroupId=web, SecurityGroupRuleIds=[icmp_rule])
    assert "icmp" not in {p["IpProtocol"] for p in group(cloud, web)["IpPermissions"]}
    # Egress: replace the default with one rule.
    cloud.ec2.revoke_security_group_egress(GroupId=web, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    cloud.ec2.authorize_security_group_egress(GroupId=web, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    [eg] = group(cloud, web)["IpPermissionsEgress"]
    assert (eg["IpProtocol"], eg["FromPort"], eg["ToPort"]) == ("tcp", 0, 65535)
    # A group another group's rule refers to cannot be deleted until the rule goes.
    expect_error(cloud.ec2.delete_security_group, "DependencyViolation", GroupId=peer)
    cloud.ec2.revoke_security_group_ingress(GroupId=web, IpPermissions=[
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": peer}]}])
    cloud.ec2.delete_security_group(GroupId=peer)
    expect_error(cloud.ec2.describe_security_groups, "InvalidGroup.NotFound", GroupIds=[peer])


def test_bad_rules_and_names_are_refused_with_ec2_codes(cloud, groups):
    gid = groups()
    name = group(cloud, gid)["GroupName"]
    expect_error(cloud.ec2.create_security_group, "InvalidGroup.Duplicate", GroupName=name, Description="x")
    expect_error(cloud.ec2.create_security_group, "InvalidParameterValue", GroupName="sg-nope", Description="x")
    expect_error(cloud.ec2.describe_security_groups, "InvalidGroup.NotFound", GroupIds=["sg-0123456789abcdef0"])
    expect_error(cloud.ec2.describe_security_groups, "InvalidGroupId.Malformed", GroupIds=["nope"])
    expect_error(cloud.ec2.describe_security_groups, "InvalidGroup.NotFound", GroupNames=["no-such-group"])
    bad = [
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 70, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 70000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "10.0.0.0/33"}]},
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "not-a-cidr"}]},
        {"IpProtocol": "bogus", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ]
    for perm in bad:
        expect_error(cloud.ec2.authorize_security_group_ingress, "InvalidParameterValue", GroupId=gid,
               IpPermissions=[perm])
    expect_error(cloud.ec2.authorize_security_group_ingress, "InvalidGroup.NotFound", GroupId=gid,
           IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-0123456789abcdef0"}]}])
    expect_error(cloud.ec2.authorize_security_group_ingress, "DryRunOperation", status=412, GroupId=gid, DryRun=True,
           IpPermissions=[{"IpProtocol": "tcp", "FromPort": 1, "ToPort": 2, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert group(cloud, gid)["IpPermissions"] == []
    # Tagging, DryRun included, checks that the group is the caller's.
    for call in (cloud.ec2.create_tags, cloud.ec2.delete_tags):
        expect_error(call, "InvalidGroup.NotFound", Resources=["sg-0123456789abcdef0"],
               Tags=[{"Key": "a", "Value": "b"}])
        expect_error(call, "InvalidGroup.NotFound", Resources=["sg-0123456789abcdef0"],
               Tags=[{"Key": "a", "Value": "b"}], DryRun=True)
        expect_error(call, "DryRunOperation", status=412, Resources=[gid], Tags=[{"Key": "a", "Value": "b"}],
               DryRun=True)


def test_instances_launch_with_groups_and_a_group_in_use_cannot_be_deleted(cloud, groups, launcher):
    gid = groups()
    [default] = cloud.ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    [plain] = launcher.run_ids()
    [inst] = cloud.instances(InstanceIds=[plain])
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [default["GroupId"]]
    assert inst["SecurityGroups"][0]["GroupName"] == "default"
    [grouped] = launcher.run_ids(SecurityGroupIds=[gid])
    [inst] = cloud.instances(InstanceIds=[grouped])
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [gid]
    found = cloud.instances(Filters=[launcher.filter, {"Name": "instance.group-id", "Values": [gid]}])
    assert [i["InstanceId"] for i in found] == [grouped]
    attr = cloud.ec2.describe_instance_attribute(InstanceId=grouped, Attribute="groupSet")
    assert [g["GroupId"] for g in attr["Groups"]] == [gid]
    expect_error(launcher.run, "InvalidGroup.NotFound", SecurityGroupIds=["sg-0123456789abcdef0"])
    expect_error(cloud.ec2.delete_security_group, "DependencyViolation", GroupId=gid)
    cloud.ec2.terminate_instances(InstanceIds=[grouped])
    cloud.wait("instance_terminated", InstanceIds=[grouped])
    cloud.ec2.delete_security_group(GroupId=gid)


def test_an_instances_groups_are_replaced_with_modify_instance_attribute(cloud, groups, launcher):
    web, db = groups(), groups()
    [iid] = launcher.run_ids()
    cloud.wait("instance_running", InstanceIds=[iid])
    cloud.ec2.modify_instance_attribute(InstanceId=iid, Groups=[web, db])
    [inst] = cloud.instances(InstanceIds=[iid])
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [web, db]
    attr = cloud.ec2.describe_instance_attribute(InstanceId=iid, Attribute="groupSet")
    assert [g["GroupId"] for g in attr["Groups"]] == [web, db]
    # The group the instance left can go; one it uses cannot.
    [default] = cloud.ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    found = cloud.instances(Filters=[launcher.filter, {"Name": "instance.group-id", "Values": [default["GroupId"]]}])
    assert iid not in [i["InstanceId"] for i in found]
    expect_error(cloud.ec2.delete_security_group, "DependencyViolation", GroupId=db)
    # The CLI's form, and EC2's refusals.
    cloud.aws("ec2", "modify-instance-attribute", "--instance-id", iid, "--groups", db)
    assert [g["GroupId"] for g in cloud.instances(InstanceIds=[iid])[0]["SecurityGroups"]] == [db]
    expect_error(cloud.ec2.modify_instance_attribute, "InvalidGroup.NotFound", InstanceId=iid,
                 Groups=["sg-0123456789abcdef0"])
    expect_error(cloud.ec2.modify_instance_attribute, "DryRunOperation", 412, InstanceId=iid, Groups=[web],
                 DryRun=True)
    assert [g["GroupId"] for g in cloud.instances(InstanceIds=[iid])[0]["SecurityGroups"]] == [db]
    cloud.ec2.terminate_instances(InstanceIds=[iid])
    cloud.wait("instance_terminated", InstanceIds=[iid])
    expect_error(cloud.ec2.modify_instance_attribute, "IncorrectInstanceState", InstanceId=iid, Groups=[web])


def test_cli_flat_form(cloud, groups):
    gid = groups()
    cloud.aws("ec2", "authorize-security-group-ingress", "--group-id", gid, "--protocol", "tcp",
              "--port", "22", "--cidr", "203.0.113.0/24")
    [perm] = group(cloud, gid)["IpPermissions"]
    assert (perm["IpProtocol"], perm["FromPort"], perm["ToPort"]) == ("tcp", 22, 22)
    assert perm["IpRanges"] == [{"CidrIp": "203.0.113.0/24"}]
    listed = cloud.aws("ec2", "describe-security-groups", "--group-ids", gid)
    assert listed["SecurityGroups"][0]["GroupId"] == gid
    cloud.aws("ec2", "revoke-security-group-ingress", "--group-id", gid, "--protocol", "tcp",
              "--port", "22", "--cidr", "203.0.113.0/24")
    assert group(cloud, gid)["IpPermissions"] == []
